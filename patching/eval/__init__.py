"""`patchd evaluate`: the paper's sequential-editing protocol, its editors, metrics and plots.

    evaluate.py   the stream: mistakes in order, SR / GR right after each edit, ER / TrainR / TestR
                  / locality at the end and along the curve; Ctrl-C writes the partial report
    record.py     the Editor protocol and EditRecord: what every editor is and returns
    editors.py    tpatcher (the daemon's own Patcher), ft-last, ft-all, mend; make_editor by name
    evaldata.py   built-in tasks and the generic JSON Lines format; metrics.py, plots.py (matplotlib)
    resume.py     `--resume`: a stopped stream goes on where it stopped
    bench.py      `patchd bench edit`: the cached trainer against the reference procedure
    mend/         MEND, trained and run as a second editor

A new editor: a class with `name`, `neurons` and `edit(...) -> EditRecord`, built in make_editor,
named in `--editor`'s choices (daemon/cli/evaluate.py). The daemon never imports this package.
"""
