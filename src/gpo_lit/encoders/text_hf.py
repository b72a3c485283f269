"""Any Hugging Face transformer as a text encoder (BERT by default; CLIP's text tower too).

A composite checkpoint (CLIP, SigLIP, …: a config with a ``text_config``) gives its text model
alone: ``openai/clip-vit-base-patch32`` builds a ``CLIPTextModel`` from the checkpoint's
``text_model`` weights (the vision tower is not loaded). Its ``last_hidden_state`` is after the
final LayerNorm and before the text projection, with its own causal attention (REFERENCE §12).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from gpo_lit.errors import GpoLitError


def load_hf_config(name_or_path: str):
    """Load a transformers config from a local path or the local HF cache, never the network;
    of a composite (text + vision) checkpoint, its text config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return getattr(config, "text_config", None) or config
    except (OSError, ValueError) as err:
        raise GpoLitError(
            f"model.text.name_or_path: expected a local model folder or a model in the local "
            f"Hugging Face cache (no network is used), found nothing at '{name_or_path}' "
            f"({type(err).__name__}); download it once with `huggingface-cli download "
            f"{name_or_path}` or point name_or_path at a folder"
        ) from None


class HFTextEncoder(nn.Module):
    """Last hidden state of every token (incl. [CLS]/[SEP], CLIP's start/end) →
    ``Linear(hidden → d)``; padding is masked out of attention.

    Args:
        name_or_path: model name in the local HF cache or a local folder.
        embed_dim: joint embedding width d.
        pretrained: load pretrained weights (False = random init from the config; tests use tiny
            configs this way).
        config_overrides: fields replaced in the loaded config (e.g. tiny sizes for tests).
    """

    def __init__(
        self,
        name_or_path: str = "bert-base-uncased",
        embed_dim: int = 1024,
        pretrained: bool = True,
        config_overrides: dict | None = None,
    ) -> None:
        super().__init__()

        config = load_hf_config(name_or_path)
        for key, value in (config_overrides or {}).items():
            setattr(config, key, value)
        if pretrained:
            # from_pretrained hands the model back in eval mode; Lightning trains every module in
            # the mode it was built in, so without this BERT would fine-tune with its dropout off
            # (the paper's code puts the text encoder in train mode every epoch).
            self.bert = _from_pretrained(name_or_path, config).train()
        else:
            self.bert = _from_config(config)
        self.linear = nn.Linear(config.hidden_size, embed_dim)
        self.name_or_path = str(Path(name_or_path)) if Path(name_or_path).exists() else name_or_path

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """ids ``[B, L]``, lengths ``[B]`` (counting [CLS] and [SEP]) → (``[B, L, d]``, lengths)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = (positions[None, :] < lengths.to(ids.device)[:, None]).long()
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.linear(hidden), lengths.to(ids.device)


# The pooler ([CLS] → tanh) is unused by VSE∞ (all tokens are pooled): leave it out where the
# architecture allows, so DDP sees no parameters without gradients.
def _from_pretrained(name_or_path: str, config) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(
            name_or_path, config=config, local_files_only=True, add_pooling_layer=False
        )
    except TypeError:
        return AutoModel.from_pretrained(name_or_path, config=config, local_files_only=True)


def _from_config(config) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)
