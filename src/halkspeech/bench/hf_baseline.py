"""The peer in the same run: Hugging Face transformers' WhisperForConditionalGeneration (fp16, SDPA).

Both engines get the same random weights of a named shape: the HF model is initialised on the GPU and its
state dict, mapped to OpenAI names, is what HalkSpeech loads.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from halkspeech.model.dims import KNOWN_DIMS, ModelDims, alignment_heads_for
from halkspeech.model.hf import to_openai
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import LoadedWeights


def hf_config(dims: ModelDims, tokenizer: Tokenizer) -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(  # type: ignore[call-arg]
        vocab_size=dims.n_vocab,
        num_mel_bins=dims.n_mels,
        d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer,
        decoder_layers=dims.n_text_layer,
        encoder_attention_heads=dims.n_audio_head,
        decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state,
        decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx,
        max_target_positions=dims.n_text_ctx,
        decoder_start_token_id=tokenizer.sot,
        pad_token_id=tokenizer.eot,
        eos_token_id=tokenizer.eot,
        bos_token_id=tokenizer.eot,
        begin_suppress_tokens=[*tokenizer.encode(" "), tokenizer.eot],
        suppress_tokens=list(tokenizer.suppress_tokens()),
        attn_implementation="sdpa",
    )


class HFWhisper:
    """A random-weight HF Whisper of a catalog shape on `device`, and the same weights for HalkSpeech."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
        from transformers import WhisperForConditionalGeneration

        self.name = name
        self.dims = KNOWN_DIMS[name]
        self.tokenizer = Tokenizer.for_model(self.dims)
        self.device = device
        torch.manual_seed(seed)
        with torch.device(device):
            model = WhisperForConditionalGeneration(hf_config(self.dims, self.tokenizer))
        self.model = model.to(dtype=dtype).eval()  # type: ignore[call-arg]

    def weights(self) -> LoadedWeights:
        """The HF model's weights under OpenAI names (no copy: the tensors are shared)."""
        state = to_openai(dict(self.model.state_dict()))
        return LoadedWeights(
            dims=self.dims,
            state_dict=state,
            alignment_heads=alignment_heads_for(self.name, self.dims),  # as random_weights gives them
            name=self.name,
            source=f"random weights of {self.name}, shared with the HF peer (benchmarking only)",
        )

    @torch.no_grad()
    def generate(self, features: torch.Tensor, prompt: tuple[int, ...], tokens: int) -> torch.Tensor:
        """Greedy decode exactly `tokens` tokens per window (min = max new tokens): [B, tokens]."""
        batch = features.shape[0]
        decoder_input_ids = torch.tensor([list(prompt)] * batch, device=self.device)
        out = self.model.generate(
            features.to(self.model.dtype),
            decoder_input_ids=decoder_input_ids,
            min_new_tokens=tokens,
            max_new_tokens=tokens,
            do_sample=False,
        )
        # the peer must decode as much as we do: the new tokens alone (transformers 5.25), or after the prompt
        sequences = cast(torch.Tensor, out if isinstance(out, torch.Tensor) else out["sequences"])
        if sequences.shape[0] != batch or sequences.shape[-1] not in (tokens, len(prompt) + tokens):
            raise RuntimeError(f"HF decoded {tuple(sequences.shape)} for {batch} windows of {tokens} tokens")
        return sequences

    @torch.no_grad()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.encoder(features.to(self.model.dtype)).last_hidden_state
