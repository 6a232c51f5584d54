"""The fast SAM vision attention computes what transformers computes: outputs and gradients, with PEFT LoRA,
gradient checkpointing, torch.compile and DDP; switching it on and off changes no parameter or key."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from conftest import random_rel_pos_sam, rel_err
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionLayer, SamVisionSdpaAttention

from octsam.errors import OctSamError
from octsam.models.fast_attention import (
    FastSamVisionAttention,
    FastSamVisionLayer,
    disable_fast_attention,
    enable_fast_attention,
    fast_attention_mode,
)

TOL = 1e-5
IMAGE = 24  # patch 2 -> a 12 x 12 token grid; window 4 divides it, window 5 pads it to 15 x 15.


def tiny_sam(window_size: int = 4, attn_implementation: str = "sdpa", seed: int = 0) -> SamModel:
    """The team's tiny SAM, with random (non-zero) relative-position tables so that a wrong bias shows."""
    return random_rel_pos_sam(IMAGE, window_size, attn_implementation=attn_implementation, seed=seed)


def encoder_out_and_grads(model: SamModel, pixels: torch.Tensor, weight: torch.Tensor):
    """Image embeddings and the gradients of a random projection of them w.r.t. the input and every parameter."""
    params = [p for p in model.vision_encoder.parameters() if p.requires_grad]
    x = pixels.clone().requires_grad_(True)
    out = model.vision_encoder(x).last_hidden_state
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    return out.detach(), grads


def assert_same(ref, new) -> None:
    out_ref, grads_ref = ref
    out_new, grads_new = new
    assert rel_err(out_new, out_ref) <= TOL
    assert len(grads_new) == len(grads_ref)
    for g_new, g_ref in zip(grads_new, grads_ref):
        assert g_ref.abs().sum() > 0, "a zero reference gradient would hide a wrong path"
        assert rel_err(g_new, g_ref) <= TOL


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, IMAGE, IMAGE), torch.randn(2, 32, IMAGE // 2, IMAGE // 2)


@pytest.mark.parametrize("window_size", [4, 5], ids=["window-divides", "window-pads"])
@pytest.mark.parametrize("mode", ["auto", "fold", "fold_flash", "bias", "triton"])  # triton: no layer qualifies here
def test_outputs_and_gradients_match_transformers(window_size, mode, inputs):
    model = tiny_sam(window_size)
    ref = encoder_out_and_grads(model, *inputs)
    assert enable_fast_attention(model, mode=mode) == 2
    assert fast_attention_mode(model) == mode
    assert_same(ref, encoder_out_and_grads(model, *inputs))


@pytest.mark.parametrize("layer", [0, 1], ids=["windowed", "global"])
def test_single_layer_matches(layer, inputs):
    """Each kind of layer on its own, so a compensating error in the other cannot hide."""
    model = tiny_sam(window_size=5)
    block = model.vision_encoder.layers[layer]
    assert (block.window_size > 0) == (layer == 0)
    torch.manual_seed(2)
    x = torch.randn(2, IMAGE // 2, IMAGE // 2, 36)
    w = torch.randn_like(x)

    def run():
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        return out.detach(), torch.autograd.grad((out * w).sum(), [xi, *block.parameters()])

    ref = run()
    for mode in ("fold", "fold_flash", "bias"):
        enable_fast_attention(block, mode=mode)
        assert_same(ref, run())


def test_eager_attention_class_is_switched_and_restored(inputs):
    model = tiny_sam(attn_implementation="eager")
    assert type(model.vision_encoder.layers[0].attn) is SamVisionAttention
    ref = encoder_out_and_grads(model, *inputs)
    assert enable_fast_attention(model, mode="fold") == 2
    assert_same(ref, encoder_out_and_grads(model, *inputs))
    assert disable_fast_attention(model) == 2
    assert type(model.vision_encoder.layers[0].attn) is SamVisionAttention


def test_disable_restores_classes_and_bitwise_outputs(inputs):
    model = tiny_sam(window_size=5)
    before = encoder_out_and_grads(model, *inputs)
    enable_fast_attention(model)
    assert all(type(layer) is FastSamVisionLayer for layer in model.vision_encoder.layers)
    assert all(type(layer.attn) is FastSamVisionAttention for layer in model.vision_encoder.layers)
    assert disable_fast_attention(model) == 2
    assert all(type(layer) is SamVisionLayer for layer in model.vision_encoder.layers)
    assert all(type(layer.attn) is SamVisionSdpaAttention for layer in model.vision_encoder.layers)
    assert fast_attention_mode(model) is None
    after = encoder_out_and_grads(model, *inputs)
    assert torch.equal(after[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    assert disable_fast_attention(model) == 0


def test_state_dict_unchanged_and_enable_is_idempotent():
    model = tiny_sam()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    assert enable_fast_attention(model) == 2
    assert enable_fast_attention(model, mode="bias") == 2  # a second call only changes the mode
    assert fast_attention_mode(model) == "bias"
    assert [n for n, _ in model.named_parameters()] == names
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(torch.equal(new_state[k], state[k]) for k in state)
    model.load_state_dict(state)  # strict: the same keys load back
    assert enable_fast_attention(torch.nn.Linear(2, 2)) == 0


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(OctSamError, match="mode"):
        enable_fast_attention(tiny_sam(), mode="cuda-magic")


def lora_sam(window_size: int) -> torch.nn.Module:
    model = get_peft_model(tiny_sam(window_size), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    with torch.no_grad():  # LoRA B starts at zero, which would hide the adapter path and give A no gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def sam_out_and_grads(model: torch.nn.Module, pixels: torch.Tensor):
    boxes = torch.tensor([[[2.0, 3.0, 18.0, 20.0]], [[5.0, 1.0, 22.0, 14.0]]])
    params = [p for p in model.parameters() if p.requires_grad]
    x = pixels.clone().requires_grad_(True)
    out = model(pixel_values=x, input_boxes=boxes, multimask_output=False)
    torch.manual_seed(3)
    loss = (out.pred_masks * torch.randn_like(out.pred_masks)).sum() + out.iou_scores.sum()
    return out.pred_masks.detach(), torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("window_size", [4, 5], ids=["window-divides", "window-pads"])
def test_peft_lora_model_matches(window_size, inputs):
    model = lora_sam(window_size)
    keys = list(model.state_dict())
    ref = sam_out_and_grads(model, inputs[0])
    assert enable_fast_attention(model) == 2  # walks through PEFT's wrappers
    assert list(model.state_dict()) == keys
    for layer in model.base_model.model.vision_encoder.layers:
        assert isinstance(layer.attn, FastSamVisionAttention)
        assert isinstance(layer.attn.qkv, LoraLayer)  # LoRA still wraps the same qkv
    new = sam_out_and_grads(model, inputs[0])
    lora_grads = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora_grads) == 4  # A and B of both layers are among the compared gradients
    assert_same(ref, new)


def test_adapter_trained_on_one_path_loads_into_the_other(inputs):
    fast = lora_sam(5)
    enable_fast_attention(fast)
    adapter = {k: v for k, v in fast.state_dict().items() if "lora_" in k}
    plain = get_peft_model(tiny_sam(5), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    missing, unexpected = plain.load_state_dict(adapter, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    assert_same(sam_out_and_grads(plain, inputs[0]), sam_out_and_grads(fast, inputs[0]))


def test_gradient_checkpointing(inputs):
    model = lora_sam(5)
    model.train()
    ref = sam_out_and_grads(model, inputs[0])
    enable_fast_attention(model)
    sam = model.base_model.model
    if hasattr(sam, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        sam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        sam.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.base_model.model.vision_encoder.layers[0].gradient_checkpointing
    calls = []
    model.base_model.model.vision_encoder.layers[1].attn.register_forward_hook(lambda *a: calls.append(1))
    assert_same(ref, sam_out_and_grads(model, inputs[0]))
    assert len(calls) == 2, "the checkpointed layer must run again in backward"


def test_torch_compile_traces_without_graph_breaks(inputs):
    """Dynamo + AOTAutograd (fullgraph, so any graph break fails) on each fast layer; inductor codegen is the
    GPU benchmark's job (it takes minutes on 2 CPU cores)."""
    model = tiny_sam(window_size=5)
    enable_fast_attention(model, mode="fold_flash")
    torch.manual_seed(4)
    for block in model.vision_encoder.layers:
        x = torch.randn(2, IMAGE // 2, IMAGE // 2, 36)
        w = torch.randn_like(x)
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        results = []
        for fn in (block, compiled):
            xi = x.clone().requires_grad_(True)
            out = fn(xi)
            results.append((out.detach(), torch.autograd.grad((out * w).sum(), [xi, *block.parameters()])))
        assert_same(results[0], results[1])


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("OCTSAM_RUN_SLOW"),
    reason="inductor compiles C++ for ~3-4 min on 2 CPU cores; set OCTSAM_RUN_SLOW=1 (the GPU check compiles ViT-B)",
)
def test_torch_compile_inductor_whole_lora_model(inputs):
    model = lora_sam(5)
    ref = sam_out_and_grads(model, inputs[0])
    enable_fast_attention(model)
    torch._dynamo.reset()
    assert_same(ref, sam_out_and_grads(torch.compile(model), inputs[0]))


def test_ddp_single_process(tmp_path, inputs):
    """DDP with find_unused_parameters=False and static_graph over a LoRA model on the fast path (gloo, 1 rank)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = lora_sam(5)
        enable_fast_attention(model)
        ref = sam_out_and_grads(model, inputs[0])
        ddp = DistributedDataParallel(model, find_unused_parameters=False, static_graph=True)
        boxes = torch.tensor([[[2.0, 3.0, 18.0, 20.0]], [[5.0, 1.0, 22.0, 14.0]]])
        for _ in range(2):  # static_graph checks the graph on the second iteration
            ddp.zero_grad()
            out = ddp(pixel_values=inputs[0], input_boxes=boxes, multimask_output=False)
            torch.manual_seed(3)
            ((out.pred_masks * torch.randn_like(out.pred_masks)).sum() + out.iou_scores.sum()).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(rel_err(g, r) <= TOL for g, r in zip(grads, ref[1][1:]))
    finally:
        dist.destroy_process_group()


def test_throughput_benchmark_smoke(tmp_path):
    """benchmarks/throughput.py runs both paths on the CPU and writes one table (no assertion on speed)."""
    import importlib.util

    from conftest import REPO_ROOT

    path = str(REPO_ROOT / "benchmarks" / "throughput.py")
    spec = importlib.util.spec_from_file_location("throughput_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    argv = ["--model", "tiny", "--device", "cpu", "--variants", "default,fast,fast:fold", "--steps", "1"]
    argv += ["--warmup", "0", "--check-exact", "--dataloader", "synthetic", "--workers", "0", "--loader-images", "4"]
    argv += ["--loader-size", "64", "--profile", "fast", "--layer-bench", "--layer-steps", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    table = text.split("\n\n")[0].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| default", "| fast", "| fast:fold"]
    for row in table[2:]:  # train img/s, step ms and infer img/s are numbers
        cells = row.strip("| ").split(" | ")
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[4]) > 0
    assert "model FLOPs per image: training step" in text and "Exactness" in text and "Data loader alone" in text
    assert "| fast fold | fp32 |" in text and "| global | fold |" in text and "flex" not in text
    assert "Profile of one `fast` training step" in text and "| matrix products |" in text
    with pytest.raises(SystemExit):  # a profile of a variant that does not run is refused up front
        bench.parse_args(["--variants", "default", "--profile", "fast"])


@functools.cache
def _throughput_bench():
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "throughput_bench_cat", str(REPO_ROOT / "benchmarks" / "throughput.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize(
    "name, category",
    [
        ("nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "matrix products"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopB_NNT", "matrix products"),
        (
            "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_256x128x64_1x2x1_0_tnn_align8_warpspecialized",
            "matrix products",
        ),
        (
            "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>(...)",
            "matrix products",
        ),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matrix products"),
        ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "matrix products"),
        ("triton_tem_fused_mm_t_0", "matrix products"),
        (
            "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
            "attention",
        ),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 32, 4>, false>(...)", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
        ("_bwd_dkdv_kernel", "attention"),
        ("_bwd_dq_kernel", "attention"),
        ("_fwd_kernel", "attention"),
        ("void at::native::elementwise_kernel<128, 2, ...>", "elementwise"),
        ("triton_poi_fused_add_gelu_3", "fused elementwise (triton)"),
        ("triton_per_fused_native_layer_norm_5", "normalisation / softmax"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copies / cat / layout"),
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda...>", "copies / cat / layout"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("something_new", "other"),
    ],
)
def test_profile_kernel_categories(name, category):
    """The profile files each kernel by name: cuBLAS (``nvjet_*``), CUTLASS and ``*gemm*`` kernels are matrix
    products, attention kernels (including octsam's Triton ones and ``fmha_cutlass*``) attention."""
    assert _throughput_bench().kernel_category(name) == category


def test_layer_subclass_keeps_its_class_and_stays_exact(inputs):
    """A layer subclass (e.g. one made by a wrapper) is left alone; its attention still switches, on windows."""

    class WrappedLayer(SamVisionLayer):
        pass

    model = tiny_sam(window_size=5)
    for layer in model.vision_encoder.layers:
        layer.__class__ = WrappedLayer
    ref = encoder_out_and_grads(model, *inputs)
    assert enable_fast_attention(model, mode="fold") == 2
    assert all(type(layer) is WrappedLayer for layer in model.vision_encoder.layers)
    assert_same(ref, encoder_out_and_grads(model, *inputs))


def test_throughput_benchmark_takes_another_base(tiny_base):
    """``--model FOLDER``: the benchmark builds that base's architecture (random weights), e.g. a base added later."""
    from transformers import SamConfig

    config = _throughput_bench().sam_config(tiny_base, None)
    saved = SamConfig.from_pretrained(tiny_base)
    assert config.vision_config.hidden_size == saved.vision_config.hidden_size
    assert config.vision_config.image_size == saved.vision_config.image_size
    assert _throughput_bench().sam_config(tiny_base, 32).vision_config.image_size == 32
    with pytest.raises(SystemExit):
        _throughput_bench().sam_config("/nonexistent/base", None)
