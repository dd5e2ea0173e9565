"""Guest side of test_generated_bad_input_with_hypothesis: every case in a JSON file
(argv lists, drawn on the host by tests/cli_fuzz.py) through the real CLI, in this one
process, on one real device opened once. Writes a JSON list of [exit code, stderr] to
RESULTS_JSON (stdout is the CLI's: a case that wrongly succeeds prints sectors there).

Usage: run_cli_cases.py BDF CASES_JSON RESULTS_JSON
"""

import contextlib
import io
import json
import sys

from virtio_user import VirtioBlk, cli


class KeepOpen:
    """The device, opened once for every case: binding and set-up cost more than a
    case under TCG, and what is tested here is the CLI's handling of its input."""

    def __init__(self, bdf: str) -> None:
        self.dev = VirtioBlk.open(bdf)

    def __call__(self, args: object) -> "KeepOpen":
        return self

    def __enter__(self) -> VirtioBlk:
        return self.dev

    def __exit__(self, *exc: object) -> None:
        pass


def run(bdf: str, argv: list[str], opener: KeepOpen) -> list[object]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--device", bdf, *argv], opener=opener)
        except SystemExit as exc:
            code = exc.code
    return [code, err.getvalue()]


def main() -> None:
    bdf, cases_path, results_path = sys.argv[1:4]
    with open(cases_path) as f:
        cases = json.load(f)
    opener = KeepOpen(bdf)
    try:
        results = [run(bdf, argv, opener) for argv in cases]
    finally:
        opener.dev.close()
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
