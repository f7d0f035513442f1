"""python run_search.py --gpus 4 --num-samples 64: search how best to fine-tune on CIFAR-100."""
from __future__ import annotations

import sys

from analysis.study import StudyUnwritable
from planning.settings import parse_settings
from trainable.errors import SearchStopped, UserError


def main(argv: list[str] | None = None) -> int:
    try:
        s = parse_settings(argv)
        from search.run import list_spaces, run_search  # after the flags: --help and a bad flag need no Ray
        if s.list_spaces:
            print(list_spaces())
            return 0
        run_search(s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StudyUnwritable, SearchStopped) as e:  # results so far are kept; --resume continues
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: results so far are kept; continue with --resume --name NAME", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
