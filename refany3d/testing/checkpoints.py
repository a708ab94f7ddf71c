"""Tiny random-weight checkpoints of every real perception backend (GroundingDINO in both
implementations, SAM in both, Depth Pro), saved the way their loaders expect, for the tests."""

from __future__ import annotations

from pathlib import Path

# The tiny BERT's vocabulary: the words of `views.ITEMS` and the prompt punctuation.
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ".",
    "?",
    "red",
    "mug",
    "wooden",
    "chair",
    "toy",
    "car",
]
WORDS += ["blue", "vase", "teapot", "lamp", "a", "the"]


def _tiny_bert(path: Path) -> None:
    """A 1-layer BERT with a 19-word vocabulary (model + tokenizer) in `path`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(cfg).save_pretrained(path)


def tiny_hf_grounding_dino(path: Path) -> Path:
    import torch
    from transformers import (
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    bert = path / "bert"
    _tiny_bert(bert)
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        image_size=64,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = {
        "model_type": "bert",
        "vocab_size": len(WORDS),
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    cfg = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=16,
    )
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor, BertTokenizerFast.from_pretrained(bert)).save_pretrained(path)
    return path


def tiny_groundingdino_py(root: Path) -> tuple[Path, Path, Path]:
    """(config .py, checkpoint .pth, BERT dir) of a groundingdino-py model with 1 encoder/decoder layer."""
    import groundingdino.models.GroundingDINO.groundingdino as gd_module
    import torch
    from groundingdino.util.slconfig import SLConfig

    from refany3d.models.detector.groundingdino import build_groundingdino

    torch.manual_seed(0)
    bert = root / "bert"
    _tiny_bert(bert)
    src = Path(gd_module.__file__).parents[2] / "config" / "GroundingDINO_SwinT_OGC.py"
    text = src.read_text()
    for old, new in [
        ("enc_layers = 6", "enc_layers = 1"),
        ("dec_layers = 6", "dec_layers = 1"),
        ("num_queries = 900", "num_queries = 20"),
        ("dim_feedforward = 2048", "dim_feedforward = 64"),
        ("use_checkpoint = True", "use_checkpoint = False"),
        ("use_transformer_ckpt = True", "use_transformer_ckpt = False"),
    ]:
        assert old in text
        text = text.replace(old, new)
    config = root / "gd_tiny.py"
    config.write_text(
        text.replace('text_encoder_type = "bert-base-uncased"', f'text_encoder_type = "{bert}"')
    )
    args = SLConfig.fromfile(str(config))
    args.device = "cpu"
    ckpt = root / "gd_tiny.pth"
    torch.save({"model": build_groundingdino(args).state_dict()}, ckpt)
    return config, ckpt, bert


def tiny_sam_checkpoint(path: Path) -> Path:
    """State dict of a SAM with a 2-block, 32-wide image encoder (1 windowed + 1 global block) at 256 px."""
    import torch

    torch.manual_seed(0)
    from refany3d.models.segmenter.sam import build_sam

    shape = {
        "encoder_embed_dim": 32,
        "encoder_depth": 2,
        "encoder_num_heads": 2,
        "encoder_global_attn_indexes": [1],
    }
    sam = build_sam(**shape, image_size=256)
    for name, p in sam.named_parameters():
        if "rel_pos" in name:  # zero-initialised in SAM: random values make the test meaningful
            torch.nn.init.normal_(p, std=0.02)
    torch.save(sam.state_dict(), path)
    return path


def tiny_hf_sam(path: Path) -> Path:
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor, SamVisionConfig

    torch.manual_seed(0)
    vision = SamVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=128,
        global_attn_indexes=[1],
        window_size=4,
        output_channels=32,
        num_pos_feats=16,
    )
    cfg = SamConfig(
        vision_config=vision,
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": 128,
            "patch_size": 16,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "iou_head_hidden_dim": 32,
        },
    )
    SamModel(cfg).save_pretrained(path)
    processor = SamProcessor(
        SamImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    )
    processor.save_pretrained(path)
    return path


def tiny_depth_pro(path: Path) -> Path:
    import torch
    from transformers import DepthProConfig, DepthProForDepthEstimation, DepthProImageProcessor

    torch.manual_seed(0)
    dino = {
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "patch_size": 8,
        "image_size": 32,
    }
    cfg = DepthProConfig(
        fusion_hidden_size=16,
        patch_size=32,
        intermediate_hook_ids=[1, 0],
        intermediate_feature_dims=[16, 8],
        scaled_images_ratios=[0.5, 1.0],
        scaled_images_overlap_ratios=[0.0, 0.25],
        scaled_images_feature_dims=[32, 16],
        image_model_config=dino,
        patch_model_config=dino,
        fov_model_config=dino,
        use_fov_model=True,
        num_fov_head_layers=1,
    )
    model = DepthProForDepthEstimation(cfg)
    with torch.no_grad():  # a plausible field of view (random weights may predict a negative one)
        model.fov_model.head.layers[2].weight.mul_(0.01)
        model.fov_model.head.layers[2].bias.fill_(50.0)
    model.save_pretrained(path)
    DepthProImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path
