import os
import sys

from device_agent.cli import main

code = main()
try:
    sys.stdout.flush()
except (BrokenPipeError, ValueError):
    # The host has gone (every event is mirrored to the job's events.jsonl): what stdout
    # still buffers cannot reach it, and the interpreter's own flush at exit would turn the
    # agent's exit code into 120. Point stdout at /dev/null so the code says what happened.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
sys.exit(code)
