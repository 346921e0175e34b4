# cpsl-pipeline: the whole CPSL chain as one Snakemake workflow.
#
#   snakemake --cores 2                                   # the synthetic demo (config.yaml: experiments: [demo])
#   snakemake --cores 8 --config experiments=[gta5_cityscapes]
#
# Every rule calls `python -m cpsl <step> --config <resolved step config> --out <dir>`; the resolved configs are
# written under results/{experiment}/configs/ when this file is parsed (see cpsl/workflow.py).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/collect.smk"


rule all:
    default_target: True
    input:
        W.final_targets(config),
