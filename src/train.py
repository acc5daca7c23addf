"""Train one GAN (or, with ``-m``, a sweep of them): ``python src/train.py loss=feature_matching data=ring8``.

Hydra composes ``conf/config.yaml`` with the chosen options; the run folder is Hydra's output directory. The body
is :mod:`ganlab.train`, which the installed ``ganlab-train`` command runs too. A run that cannot go on ends with
one line and its own exit code: 2 bad input, 3 interrupted (a checkpoint of the current step was written),
4 diverged (see ``ganlab.errors``).
"""

from ganlab.train import main

if __name__ == "__main__":
    main()
