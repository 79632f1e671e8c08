#!/bin/sh
# Entry point of the image: flags alone go to the deepspeed runner (`IMAGE --no_ssh --node_rank=0 ...`),
# anything else runs as given (`IMAGE deepspeed ...`, `IMAGE labs plan JOB`, `IMAGE bash`).
set -e
case "${1:-}" in
  -*|"") exec deepspeed "$@" ;;
  *) exec "$@" ;;
esac
