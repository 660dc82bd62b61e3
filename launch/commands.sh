# Sourced by the launchers: print a command exactly as it would run, or run it.
# shellcheck shell=bash

# The words as one shell line: plain words as they are, others in single quotes.
quoted() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="${out:+ }$word"
    else
      out+="${out:+ }'${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}

# Runs a command; with dry_run=1 prints it instead.
run() {
  if ((${dry_run:-0})); then
    quoted "$@"
  else
    "$@"
  fi
}
