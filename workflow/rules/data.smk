# Data: generate the synthetic pair (demo only) and prepare every dataset role of an experiment.
# No conda/container directive on these rules: common.smk says why (next to CPSL).


rule synth:
    """Generate the embedded synthetic domain pair in the GTA5 and Cityscapes file layouts."""
    input:
        config=lambda wc: step_config(wc.exp, "synth"),
    output:
        directory(RESULTS / "{exp}" / "synth"),
    log:
        RESULTS / "{exp}" / "logs" / "synth.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "synth.tsv"
    threads: threads_of("synth")
    resources:
        **resources_of("synth"),
    params:
        cmd=command_of("synth"),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {output:q}; }} > {log:q} 2>&1"


rule prepare:
    """Check one dataset split, convert its labels to train ids, write lists, class counts, LAB statistics."""
    input:
        unpack(prepare_inputs),
    output:
        directory(RESULTS / "{exp}" / "data" / "{role}"),
    log:
        RESULTS / "{exp}" / "logs" / "prepare_{role}.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "prepare_{role}.tsv"
    wildcard_constraints:
        role="|".join(W.DATASET_ROLES),
    threads: threads_of("prepare")
    resources:
        **resources_of("prepare"),
    params:
        cmd=command_of("prepare"),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {output:q}; }} > {log:q} 2>&1"
