"""``mpkir opt FILE --emit-cuda``: the whole program as one persistent CUDA megakernel source."""

from __future__ import annotations

from mpkir.emitters import Emitter


def _add_arguments(p) -> None:
    p.add_argument(
        "--cuda-batch",
        type=int,
        default=None,
        metavar="N",
        help="cuda: live tokens per step the task table is planned for (default: max_tokens)",
    )
    p.add_argument(
        "--cuda-sms",
        type=int,
        default=132,
        metavar="N",
        help="cuda: worker CTAs = SMs of the target GPU (default: 132, H100 SXM)",
    )
    p.add_argument(
        "--cuda-greedy",
        action="store_true",
        help="cuda: lower `sample` to greedy argmax (temperature sampling is not on the GPU yet)",
    )


def _emit(module, analysis, args) -> str:
    from mpkir.codegen.emit import emit_cuda
    from mpkir.codegen.lower import lower

    plan = lower(
        module,
        num_sms=getattr(args, "cuda_sms", 132) or 132,
        greedy=bool(getattr(args, "cuda_greedy", False)),
        batch=getattr(args, "cuda_batch", None),
    )
    return emit_cuda(plan)


EMITTER = Emitter(
    name="cuda",
    help="CUDA C++ of the persistent megakernel (compile: nvcc -gencode "
    "arch=compute_90a,code=sm_90a, or NVRTC --gpu-architecture=sm_90a)",
    emit=_emit,
    add_arguments=_add_arguments,
)
