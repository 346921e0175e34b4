# The results table and plots from every stage's metrics.json.


rule collect:
    """results/<experiment>/summary.csv and .md (one row per seed, stage and split, the experiment's own class
    columns; mean and std over seeds), results/summary.csv and .md (every experiment's mIoU rows) and results/plots/ (per-class IoU per stage, training curves, sample predictions); all of them are in
    `snakemake --report report.html`."""
    input:
        config=lambda wc: STEP_CONFIGS["collect"],
        metrics=lambda wc: W.metrics_files(config),
    output:
        csv=report(RESULTS / "summary.csv", caption="../report/summary.rst", category="Results table",
                   subcategory="all experiments (mIoU)"),
        md=RESULTS / "summary.md",
        tables=[report(RESULTS / exp / "summary.csv", caption="../report/summary.rst", category="Results table",
                       subcategory=exp) for exp in EXPERIMENTS],
        mds=[RESULTS / exp / "summary.md" for exp in EXPERIMENTS],
        plots=report(directory(RESULTS / "plots"), patterns=["{name}.png"], caption="../report/plots.rst",
                     category="Plots"),
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
