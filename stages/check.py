"""check: validate the whole params.yaml before any other stage does work.

usage: python -m stages.check OUT
It depends on every key of params.yaml, so that a key no other stage reads (a misspelling, a key left
over from an older version) still stops the next `dvc repro` or `dvc exp run` with one line. OUT's
content never changes, so a passing check reruns nothing downstream. With evaluate.inception_required it
also fetches Inception-v3's weights (stages/pipeline/inception.py), so that their absence stops the run
here, before any training or sampling.
"""

from .pipeline.inception import inception_weights
from .pipeline.io import write_text
from .pipeline.params import load_params
from .pipeline.run import check_writable, run


def main(argv: list[str]) -> None:
    (out,) = argv
    p = load_params()
    check_writable(out)
    if p.evaluate.inception_required:
        inception_weights(p)
    write_text(out, "params.yaml: every key known and in range\n")


if __name__ == "__main__":
    run(main)
