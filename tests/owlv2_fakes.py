"""A tiny random transformers OWLv2 saved as a model folder (no download), for detector tests."""
TINY = dict(
    text_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=49408, max_position_embeddings=16),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                       image_size=32, patch_size=8),
    projection_dim=32)


def save_tiny_owlv2(directory: str, seed: int = 0) -> str:
    """A randomly initialised tiny ``Owlv2ForObjectDetection`` saved with ``save_pretrained`` (safetensors)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Owlv2ForObjectDetection(transformers.Owlv2Config(**TINY)).eval()
    with torch.no_grad():  # logits well above 0, so thresholds and argmaxes are not ties
        model.class_head.logit_shift.bias.fill_(0.5)
    model.save_pretrained(directory)
    return directory
