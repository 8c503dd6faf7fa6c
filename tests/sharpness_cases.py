"""One fixed set of sharpness measurements, run in one process or in several (tests/sharpness_worker.py)."""

import torch

from hf_sam import (
    ascent_sharpness,
    average_sharpness,
    gradient_eigenvector_alignment,
    hessian_trace,
    top_hessian_eigenvalue,
    worst_case_sharpness,
)

from .testing_utils import TinyDataset, tiny_model


def run_diagnostics() -> dict[str, float]:
    """The six diagnostics of a float64 tiny MLP over 4 batches (each process of a group takes its share)."""
    model = tiny_model().double()
    batches = [{"x": b["x"].double(), "labels": b["labels"]} for b in TinyDataset().batches(16)]
    return {
        "ascent": ascent_sharpness(model, batches, rho=0.1).value,
        "worst_case": worst_case_sharpness(model, batches, rho=0.1, steps=5).value,
        "average": average_sharpness(model, batches, rho=0.5, samples=8).value,
        "top_eigenvalue": top_hessian_eigenvalue(model, batches, tol=1e-10, max_iterations=300).value,
        "trace": hessian_trace(model, batches, samples=8).value,
        "trace_hutch_plus_plus": hessian_trace(model, batches, samples=4, deflation_rank=3).value,
        "alignment": gradient_eigenvector_alignment(model, batches, tol=1e-10, max_iterations=300).value,
    }


if __name__ == "__main__":
    torch.set_printoptions(precision=10)
    print(run_diagnostics())
