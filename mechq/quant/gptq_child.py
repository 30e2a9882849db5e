"""The GPTQModel child process (see :mod:`mechq.quant.gptq`): load, quantize, save.

``method`` "gptq" (default) or "awq". AWQ runs through GPTQModel's pure-torch AWQ path
(``backend=BACKEND.AWQ_TORCH``: its default backend wants CUDA) with batch size 1, and saves
the GEMM format.

Run as a script (``python gptq_child.py JOB.json``) so that it imports only torch and GPTQModel,
not mechq or TransformerLens. The job file holds :class:`mechq.quant.gptq.GPTQJob`'s fields.
"""

import json
import sys


def main(spec_path: str) -> None:
    job = json.loads(open(spec_path).read())
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    from gptqmodel import BACKEND, AWQConfig, GPTQModel, QuantizeConfig

    awq = job.get("method", "gptq") == "awq"
    cfg = dict(bits=job["bits"], group_size=job["group_size"], sym=job["sym"],
               offload_to_disk=False)
    if not awq:
        cfg["desc_act"] = job["desc_act"]
    if job.get("dynamic"):  # per-module rules; GPTQModel resolves them and saves them
        cfg["dynamic"] = job["dynamic"]
    kw = {} if job["dtype"] == "auto" else {"dtype": getattr(torch, job["dtype"])}
    qcfg = AWQConfig(**cfg) if awq else QuantizeConfig(**cfg)
    model = GPTQModel.load(job["hf_dir"], qcfg, device=job["device"], **kw)
    rows = [{"input_ids": t, "attention_mask": [1] * len(t)} for t in job["tokens"]]
    if awq:
        model.quantize(rows, batch_size=1,
                       backend=BACKEND.AWQ_TORCH if job["device"] == "cpu" else BACKEND.AUTO)
    else:
        model.quantize(rows, batch_size=job["batch_size"])
    model.save(job["out_dir"])


if __name__ == "__main__":
    main(sys.argv[1])
