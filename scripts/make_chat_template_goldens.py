#!/usr/bin/env python3
"""Golden renderings of real chat templates by transformers' `apply_chat_template`.

lmgen renders chat templates (for `/v1/chat/completions` lines of an OpenAI batch file) with
minijinja; `cargo test` compares its renderings with these, without Python.

    python scripts/make_chat_template_goldens.py TEMPLATES_DIR [SMOLLM2.gguf]

TEMPLATES_DIR holds the models' templates as `<hub-org>-<model>.jinja` files (as llama.cpp's
`models/templates/` does; they are the `chat_template` of each model's tokenizer_config.json).
SMOLLM2.gguf (optional) adds the template stored in SmolLM2-135M-Instruct's GGUF metadata.
Writes tests/fixtures/chat_templates/<name>.json: the template, the special tokens and, for
each conversation, the rendered text or the error the template raises.
Needs: transformers, jinja2 (and gguf for the GGUF file).
"""
import json
import pathlib
import sys

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "chat_templates"

# name -> (template file, special tokens the model's tokenizer has)
TEMPLATES = {
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja",
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja",
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja",
                     {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja",
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "gemma-2": ("google-gemma-2-2b-it.jinja",
                {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}),
    "phi-3.5": ("microsoft-Phi-3.5-mini-instruct.jinja",
                {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3?\n"},
    ],
    [
        {"role": "user", "content": "Quote: \"ünïcödé\" <tag> & {braces} \\ done"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Again"},
    ],
]
# Templates that print today's date get this one instead (transformers and lmgen alike).
EXTRA = {"date_string": "26 Jul 2024"}


def render(tok, template, specials, messages, add_generation_prompt):
    try:
        text = tok.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **specials,
            **EXTRA,
        )
        return {"rendered": text}
    except Exception as e:  # the template's raise_exception(...)
        return {"error": str(e)}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    tdir = pathlib.Path(sys.argv[1])
    # Any tokenizer: apply_chat_template only renders here (tokenize=False); the special
    # tokens the template sees are passed explicitly.
    tok = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "llama")
    sources = {name: ((tdir / f).read_text(), sp) for name, (f, sp) in TEMPLATES.items()}
    if len(sys.argv) > 2:
        import gguf

        r = gguf.GGUFReader(sys.argv[2])
        f = r.fields["tokenizer.chat_template"]
        sources["smollm2"] = (bytes(f.parts[f.data[0]]).decode(),
                              {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (template, specials) in sources.items():
        cases = []
        for messages in CONVERSATIONS:
            for agp in (True, False):
                case = {"messages": messages, "add_generation_prompt": agp}
                case.update(render(tok, template, specials, messages, agp))
                cases.append(case)
        doc = {"template": template, "specials": specials, "extra": EXTRA, "cases": cases}
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        errors = sum("error" in c for c in cases)
        print(f"{path.relative_to(ROOT)}: {len(cases)} cases ({errors} raise)")


if __name__ == "__main__":
    main()
