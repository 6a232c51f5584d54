import os, torch
_Adam = torch.optim.AdamW
SCALE = float(os.environ.get("PROMPT_LR_SCALE", "1"))
def AdamW(params, lr, **kw):
    params = list(params)
    tok = [p for p in params if p.ndim == 3]
    rest = [p for p in params if p.ndim != 3]
    print("PATCH prompt params", [tuple(p.shape) for p in tok], "scale", SCALE)
    return _Adam([{"params": rest, "lr": lr}, {"params": tok, "lr": lr * SCALE}], lr=lr, **kw)
torch.optim.AdamW = AdamW
EXTRA = [s for s in os.environ.get("EXTRA_SAVE", "").split(",") if s]
if EXTRA:
    import octsam.models.sam as S
    _orig = S._lora_config
    def _lora_config(cfg):
        c = _orig(cfg)
        c.modules_to_save = list(c.modules_to_save or []) + EXTRA
        print("PATCH modules_to_save", c.modules_to_save)
        return c
    S._lora_config = _lora_config
BIAS = os.environ.get("BIAS")
if BIAS is not None:
    import torch.nn as nn
    import octsam.models.sam as S
    _init = S.ClassPrompts.__init__
    def __init__(self, num_classes, tokens_per_class, hidden_size):
        _init(self, num_classes, tokens_per_class, hidden_size)
        self.bias = nn.Parameter(torch.full((num_classes,), float(BIAS)))
    S.ClassPrompts.__init__ = __init__
    _decode = S.OctSamModel.decode
    def decode(self, embeddings, input_boxes=None, input_points=None, input_labels=None, multimask_output=False):
        masks, iou = _decode(self, embeddings, input_boxes, input_points, input_labels, multimask_output)
        if input_boxes is None and input_points is None:
            mod = getattr(self.core, S.CLASS_PROMPTS_MODULE)
            bias = mod.modules_to_save["default"].bias if hasattr(mod, "modules_to_save") else mod.bias
            masks = masks + bias.view(1, -1, 1, 1).to(masks.dtype)
        return masks, iou
    S.OctSamModel.decode = decode
    print("PATCH bias", BIAS)
if os.environ.get("MT"):
    import octsam.models.sam as S
    _decode2 = S.OctSamModel.decode
    def decode_mt(self, embeddings, input_boxes=None, input_points=None, input_labels=None, multimask_output=False):
        if input_boxes is not None or input_points is not None:
            return _decode2(self, embeddings, input_boxes, input_points, input_labels, multimask_output)
        sam = self.core
        batch = embeddings.shape[0]
        positional = sam.get_image_wide_positional_embeddings().to(embeddings.dtype).expand(batch, -1, -1, -1)
        prompts = getattr(sam, S.CLASS_PROMPTS_MODULE)()[:1]
        sparse = prompts.unsqueeze(0).expand(batch, -1, -1, -1)
        grid = embeddings.shape[-1]
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, grid, grid)
        masks, iou = sam.mask_decoder(image_embeddings=embeddings, image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse.to(embeddings.dtype), dense_prompt_embeddings=dense.to(embeddings.dtype),
            multimask_output=True)
        k = self.config.num_labels - 1
        return masks[:, 0, :k], iou[:, 0, :k]
    S.OctSamModel.decode = decode_mt
    print("PATCH mask-token head")
