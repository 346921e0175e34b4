# The results table and plots from every stage's metrics.json.
# No conda/container directive on these rules: common.smk says why (next to CPSL).


rule collect:
    """results/<experiment>/summary.csv and .md (one row per seed, stage, split and selection, the experiment's
    own class columns; mean and std over seeds; for the paper presets also the published numbers of
    results/reference/ and the differences to them), results/summary.csv and .md (every experiment's mIoU rows)
    and results/plots/ (per-class IoU per stage, training and validation curves, sample predictions); all of them
    are in `snakemake --report report.html`."""
    input:
        config=lambda wc: STEP_CONFIGS["collect"],
        metrics=lambda wc: W.metrics_files(config),
        references=lambda wc: list(W.reference_files(config, REFERENCE_DIR).values()),
    output:
        csv=report(
            RESULTS / "summary.csv",
            caption="../report/summary.rst",
            category="Results table",
            subcategory="all experiments (mIoU)",
        ),
        md=RESULTS / "summary.md",
        tables=[
            report(
                RESULTS / exp / "summary.csv",
                caption="../report/summary.rst",
                category="Results table",
                subcategory=exp,
            )
            for exp in EXPERIMENTS
        ],
        mds=[RESULTS / exp / "summary.md" for exp in EXPERIMENTS],
        plots=report(
            directory(RESULTS / "plots"), patterns=["{name}.png"], caption="../report/plots.rst", category="Plots"
        ),
    log:
        RESULTS / "logs" / "collect.log",
    benchmark:
        RESULTS / "benchmarks" / "collect.tsv"
    threads: threads_of("collect")
    resources:
        **resources_of("collect"),
    params:
        out=lambda wc, output: str(Path(output.csv).parent),
        cmd=command_of("collect"),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {params.out:q}; }} > {log:q} 2>&1"
