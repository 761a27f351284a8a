"""``python -m carom_cli consume|produce ...``: the commands carom-consume / carom-produce."""

import sys

from carom_cli.main import consume_main, produce_main

if __name__ == "__main__":
    command = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if command == "consume":
        consume_main()
    elif command == "produce":
        produce_main()
    else:
        print("usage: python -m carom_cli consume|produce TOPIC [options]", file=sys.stderr)
        sys.exit(2)
