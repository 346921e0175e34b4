# Training stages and the inference steps on their checkpoints.
# No conda/container directive on these rules: common.smk says why (next to CPSL).

STAGE_RE = "|".join(W.STAGES)


rule fetch_weights:
    """torchvision's ImageNet weights for `model.init: imagenet`, downloaded once (hash-checked) into
    results/weights/; a local rule, so that on a cluster it runs where the network is, before any GPU job."""
    input:
        config=lambda wc: STEP_CONFIGS[f"fetch/{wc.name}"],
    output:
        W.weights_dir(config) / "{name}",
    log:
        RESULTS / "logs" / "fetch_{name}.log",
    localrule: True
    params:
        out=lambda wc, output: str(Path(output[0]).parent),
        cmd=f"{CPSL} fetch-weights",
    shell:
        "{params.cmd} --config {input.config:q} --out {params.out:q} > {log:q} 2>&1"


rule train:
    """Train one stage. A killed job resumes from <stage>/checkpoints/last.pt when the workflow is rerun."""
    input:
        unpack(train_inputs),
    output:
        RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "checkpoint.pt",
    log:
        RESULTS / "{exp}" / "logs" / "seed{seed}" / "train_{stage}.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "seed{seed}" / "train_{stage}.tsv"
    wildcard_constraints:
        stage=STAGE_RE,
        seed=r"\d+",
    priority: lambda wc: W.train_priority(config, wc.exp, wc.stage)
    threads: threads_of("train")
    resources:
        **resources_of("train"),
    params:
        out=lambda wc, output: str(Path(output[0]).parent),
        cmd=command_of("train"),
    shell:
        # with resources.gpu >= 1, cmd is "<CUDA check> && <step>": the braces send both to the log
        "{{ {params.cmd} --config {input.config:q} --out {params.out:q}; }} > {log:q} 2>&1"


rule evaluate:
    """mIoU of a stage's final checkpoint on target val: <stage>/metrics.json."""
    input:
        config=lambda wc: step_config(wc.exp, f"evaluate_{wc.stage}_target_val", wc.seed),
        checkpoint=RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "checkpoint.pt",
        data=lambda wc: W.prepared_dir(config, wc.exp, "target_val"),
    output:
        RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "metrics.json",
    log:
        RESULTS / "{exp}" / "logs" / "seed{seed}" / "evaluate_{stage}.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "seed{seed}" / "evaluate_{stage}.tsv"
    wildcard_constraints:
        stage=STAGE_RE,
        seed=r"\d+",
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    params:
        out=lambda wc, output: str(Path(output[0]).parent),
        cmd=command_of("evaluate"),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {params.out:q}; }} > {log:q} 2>&1"


rule evaluate_best:
    """mIoU of a stage's best model on target val (its checkpoints/best.pt, kept by training with eval_interval):
    <stage>/metrics_best.json, selection best_on_val. The final checkpoint stands in for best.pt as the input:
    training writes best.pt before it, and best.pt is no output of the training rule (only stages that validate
    have one)."""
    input:
        config=lambda wc: step_config(wc.exp, f"evaluate_{wc.stage}_target_val_best", wc.seed),
        checkpoint=RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "checkpoint.pt",
        data=lambda wc: W.prepared_dir(config, wc.exp, "target_val"),
    output:
        RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "metrics_best.json",
    log:
        RESULTS / "{exp}" / "logs" / "seed{seed}" / "evaluate_{stage}_best.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "seed{seed}" / "evaluate_{stage}_best.tsv"
    wildcard_constraints:
        stage=STAGE_RE,
        seed=r"\d+",
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    params:
        out=lambda wc, output: str(Path(output[0]).parent),
        cmd=command_of("evaluate"),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {params.out:q}; }} > {log:q} 2>&1"


rule evaluate_split:
    """mIoU of a stage on another prepared split (source_only on the source held-out split: the domain gap)."""
    input:
        config=lambda wc: step_config(wc.exp, f"evaluate_{wc.stage}_{wc.role}", wc.seed),
        checkpoint=RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "checkpoint.pt",
        data=lambda wc: W.prepared_dir(config, wc.exp, wc.role),
    output:
        RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "eval_{role}" / "metrics.json",
    log:
        RESULTS / "{exp}" / "logs" / "seed{seed}" / "evaluate_{stage}_{role}.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "seed{seed}" / "evaluate_{stage}_{role}.tsv"
    wildcard_constraints:
        stage=STAGE_RE,
        seed=r"\d+",
        role="|".join(W.DATASET_ROLES),
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    params:
        out=lambda wc, output: str(Path(output[0]).parent),
        cmd=command_of("evaluate"),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {params.out:q}; }} > {log:q} 2>&1"


rule stage_product:
    """What a stage consumes from an earlier stage's model, over target train: soft pseudo labels
    (pseudo-soft), initial prototypes (prototypes) and the predicted class distribution (class-dist) of the
    warm-up model for stage 1; hard pseudo labels (pseudo-hard) of stages 1 and 2 for stages 2 and 3."""
    input:
        config=lambda wc: step_config(wc.exp, f"{wc.product}_{wc.stage}", wc.seed),
        checkpoint=RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "checkpoint.pt",
        data=lambda wc: W.prepared_dir(config, wc.exp, "target_train"),
    output:
        directory(RESULTS / "{exp}" / "seed{seed}" / "{stage}" / "{product}"),
    log:
        RESULTS / "{exp}" / "logs" / "seed{seed}" / "{product}_{stage}.log",
    benchmark:
        RESULTS / "{exp}" / "benchmarks" / "seed{seed}" / "{product}_{stage}.tsv"
    wildcard_constraints:
        stage=STAGE_RE,
        seed=r"\d+",
        product="|".join(W.PRODUCTS),
    priority: lambda wc: W.product_priority(config, wc.exp, wc.stage)
    threads: threads_of("stage_product")
    resources:
        **resources_of("stage_product"),
    params:
        cmd=lambda wc, threads, resources: command_of(wc.product.replace("_", "-"), "stage_product")(
            wc, threads, resources
        ),
    shell:
        "{{ {params.cmd} --config {input.config:q} --out {output:q}; }} > {log:q} 2>&1"
