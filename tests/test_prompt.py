"""Tokenizer, chat template and prompt building, checked against transformers' tokenizer and
Qwen2_5_VLProcessor."""

from __future__ import annotations

import pytest

from omnistream.errors import ConfigError, UserInputError
from omnistream.models.prompt import PlaceholderRange, Prompt, build_prompt, media_parts
from omnistream.models.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nthree\r\nfour\ttab",
    "Numbers 1234567 and 3.14159, dates 2024-01-31.",
    "Ünïcödé ñ 你好，世界！ こんにちは 🎥🙂 Ελληνικά",
    "<|im_start|>user\nspecials inline<|im_end|>\n<|vision_start|><|video_pad|><|vision_end|>",
    "don't won't it's we'll I'm they've",
    "code: def f(x):\n    return x**2  # comment",
    "<think>not special in Qwen2.5</think> <tool_call>{}</tool_call>",
    "",
]


@pytest.fixture(scope="module")
def hf_tok(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


def _video_msgs():
    return [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": "file:///clip.mp4"},
                {"type": "text", "text": "What happens in this video?"},
            ],
        }
    ]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
    ],
    _video_msgs(),
    [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "and"},
                {"type": "video", "video": "b.mp4"},
                {"type": "image_url", "image_url": {"url": "http://x/c.png"}},
                {"type": "text", "text": " which one?\n"},
            ],
        },
        {"role": "assistant", "content": "The second.  "},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Now?"}]},
    ],
]


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_special_token_ids(tiny_tokenizer, hf_tok):
    t = tiny_tokenizer
    assert (t.bos_token_id, t.eos_token_id, t.im_start_token_id, t.im_end_token_id) == (
        151643,
        151645,
        151644,
        151645,
    )
    assert (t.vision_start_token_id, t.vision_end_token_id, t.vision_pad_token_id) == (
        151652,
        151653,
        151654,
    )
    assert (t.image_token_id, t.video_token_id) == (151655, 151656)
    assert t.image_pad_token_id == 151655 and t.video_pad_token_id == 151656
    assert t.pad_token_id == hf_tok.pad_token_id == 151643
    assert t.eos_token_id == hf_tok.eos_token_id
    assert t.vocab_size == len(hf_tok) == 151665  # Qwen2.5: 151643 BPE + 22 added
    assert t.encode("<|im_start|>") == [151644]
    assert t.encode("<|video_pad|><|video_pad|>") == [151656, 151656]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tiny_tokenizer, hf_tok, text):
    ids = tiny_tokenizer.encode(text)
    assert ids == hf_tok.encode(text) == hf_tok(text)["input_ids"]
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tiny_tokenizer.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# chat template


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("vision_id", [False, True])
def test_chat_template_matches_transformers(tiny_tokenizer, hf_tok, conv, gen, vision_id):
    msgs = CONVERSATIONS[conv]
    kwargs = {"add_vision_id": True} if vision_id else {}
    ours = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, **kwargs)
    theirs = hf_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=gen, **kwargs
    )
    assert ours == theirs


def test_chat_template_content(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    text = tiny_tokenizer.apply_chat_template(CONVERSATIONS[3], add_vision_id=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>and"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|> which one?\n<|im_end|>\n"
        "<|im_start|>assistant\nThe second.  <|im_end|>\n"
        "<|im_start|>user\nVideo 2: <|vision_start|><|video_pad|><|vision_end|>Now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = tiny_tokenizer.apply_chat_template(CONVERSATIONS[3])
    assert "Picture" not in plain and "Video 1" not in plain
    sys = tiny_tokenizer.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False)
    assert sys.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert "helpful" not in sys and not sys.endswith("assistant\n")


def test_template_helpers_like_transformers(tiny_model_dir):
    tmpl = "{% if messages|length > 1 %}{{ raise_exception('only one') }}{% endif %}" \
           "{{ messages[0] | tojson }}"
    tok = Tokenizer(tiny_model_dir, chat_template=tmpl)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == \
        '{"role": "user", "content": "é"}'
    with pytest.raises(UserInputError, match="only one"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


# ---------------------------------------------------------------------------------------------
# prompt building


def test_media_parts():
    assert media_parts(CONVERSATIONS[3]) == ["image", "video", "image", "video"]
    assert media_parts(CONVERSATIONS[0]) == []


def _expanded_text(text, items):
    """What Qwen2_5_VLProcessor does: expand each pad in the string, then tokenize."""
    out, rest = "", text
    for item in items:
        pad = "<|image_pad|>" if item.kind == "image" else "<|video_pad|>"
        i = rest.index(pad)
        out += rest[:i] + pad * item.num_tokens
        rest = rest[i + len(pad):]
    return out + rest


def test_build_prompt_video(tiny_tokenizer, hf_tok, make_media_item):
    item = make_media_item("video", (3, 4, 6))  # 3 * 2 * 3 = 18 tokens
    assert item.num_tokens == 18
    p = build_prompt(tiny_tokenizer, _video_msgs(), [item])
    assert isinstance(p, Prompt) and p.media == [item]
    assert p.ranges == [PlaceholderRange(offset=p.ranges[0].offset, length=18)]
    r = p.ranges[0]
    assert p.token_ids[r.offset - 1] == tiny_tokenizer.vision_start_token_id
    assert p.token_ids[r.offset:r.end] == [tiny_tokenizer.video_token_id] * 18
    assert p.token_ids[r.end] == tiny_tokenizer.vision_end_token_id
    assert p.token_ids.count(tiny_tokenizer.video_token_id) == 18
    assert p.token_ids[-3:] == tiny_tokenizer.encode("<|im_start|>assistant\n")
    text = hf_tok.apply_chat_template(_video_msgs(), tokenize=False, add_generation_prompt=True)
    assert p.text == text
    assert p.token_ids == hf_tok(_expanded_text(text, [item]))["input_ids"]


def test_build_prompt_mixed_media(tiny_tokenizer, hf_tok, make_media_item):
    items = [
        make_media_item("image", (1, 4, 6)),  # 6
        make_media_item("video", (2, 8, 4)),  # 16
        make_media_item("image", (1, 2, 2)),  # 1
        make_media_item("video", (4, 2, 6)),  # 12
    ]
    msgs = CONVERSATIONS[3]
    p = build_prompt(tiny_tokenizer, msgs, items, add_vision_id=True)
    assert [r.length for r in p.ranges] == [6, 16, 1, 12]
    offsets = [r.offset for r in p.ranges]
    assert offsets == sorted(offsets)
    for r, item in zip(p.ranges, items):
        pad = tiny_tokenizer.image_token_id if item.kind == "image" else tiny_tokenizer.video_token_id
        assert set(p.token_ids[r.offset:r.end]) == {pad}
        assert p.token_ids[r.offset - 1] == tiny_tokenizer.vision_start_token_id
        assert p.token_ids[r.end] == tiny_tokenizer.vision_end_token_id
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                      add_vision_id=True)
    assert p.token_ids == hf_tok(_expanded_text(text, items))["input_ids"]
    assert len(p) == len(p.token_ids)


def test_build_prompt_no_media(tiny_tokenizer, hf_tok):
    msgs = CONVERSATIONS[1]
    p = build_prompt(tiny_tokenizer, msgs, [], add_generation_prompt=False)
    assert p.ranges == [] and p.media == []
    assert p.token_ids == hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)


def test_build_prompt_errors(tiny_tokenizer, make_media_item):
    video, image = make_media_item("video", (2, 4, 4)), make_media_item("image", (1, 4, 4))
    with pytest.raises(UserInputError, match="1 image/video part.*2 media item"):
        build_prompt(tiny_tokenizer, _video_msgs(), [video, video])
    with pytest.raises(UserInputError, match="0 media item"):
        build_prompt(tiny_tokenizer, _video_msgs(), [])
    with pytest.raises(UserInputError, match="part 1 of the messages is a video.*is an image"):
        build_prompt(tiny_tokenizer, _video_msgs(), [image])
    sneaky = [{"role": "user", "content": [{"type": "video"},
                                           {"type": "text", "text": "x<|video_pad|>"}]}]
    # a placeholder written in the text is text (models/literal_text.py), not a second video
    p = build_prompt(tiny_tokenizer, sneaky, [video])
    assert p.token_ids.count(tiny_tokenizer.video_token_id) == video.num_tokens and "x<|video_pad|>" in p.text


def test_build_prompt_matches_processor_for_images(tiny_model_dir, tiny_tokenizer):
    """Full oracle: transformers' Qwen2_5_VLProcessor (image path; its video processor needs
    torchvision, absent here) gives the same ids for the grid it computes itself."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    from omnistream.media.item import MediaItem

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    image_processor = transformers.Qwen2VLImageProcessor.from_pretrained(tiny_model_dir)

    class Processor(transformers.Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # allow video_processor=None
            return arg

    try:
        proc = Processor(image_processor=image_processor, tokenizer=hf_tok, video_processor=None,
                         chat_template=hf_tok.chat_template)
    except Exception as e:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"cannot build Qwen2_5_VLProcessor without a video processor: {e}")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in [(60, 90), (130, 57)]]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A?"},
                                         {"type": "image"}, {"type": "text", "text": " B!"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out = proc(text=[text], images=images, return_tensors="pt")
    items = []
    start = 0
    for g in out["image_grid_thw"].tolist():
        n = g[0] * g[1] * g[2]
        items.append(MediaItem(kind="image", pixel_values=out["pixel_values"][start:start + n],
                               grid_thw=tuple(g)))
        start += n
    p = build_prompt(tiny_tokenizer, msgs, items)
    assert p.text == text
    assert p.token_ids == out["input_ids"][0].tolist()
