import pytest

from moee_fast.prompts import PRESETS, Prompt, build_prompt, format_instruction, resolve_prompt, tokenize

EOL = 'This sentence : "{}" means in one word:"'
STS = "Retrieve semantically similar text."
STS_FORMATTED = "<|user|>\nRetrieve semantically similar text.\n<|embed|>\n"

# (text, expected with the prompteol preset, expected with reference_exact=True), no instruction.
PROMPTEOL_CASES = [
    ("A cat sleeps", EOL.format("A cat sleeps."), EOL.format("A cat sleeps.")),
    ("Is it?", EOL.format("Is it?"), EOL.format("Is it?")),
    ("Wow!", EOL.format("Wow!"), EOL.format("Wow!")),
    ("Done.", EOL.format("Done."), EOL.format("Done.")),
    ('He said "hi"', EOL.format("He said 'hi'"), EOL.format("He said 'hi'")),
    ('a "b" c', EOL.format("a 'b' c."), EOL.format("a 'b' c.")),
    ("It's 'fine'", EOL.format("It's 'fine'"), EOL.format("It's 'fine'")),
    ("snake_case name", EOL.format("snake_case name."), EOL.format("snake case name.")),
    ("", EOL.format("."), EOL.format("")),
    ("ends in space ", EOL.format("ends in space ."), EOL.format("ends in space .")),
]


@pytest.mark.parametrize("text, normal, exact", PROMPTEOL_CASES)
def test_prompteol_preprocessing(text, normal, exact):
    assert build_prompt("prompteol").format(text) == normal
    assert resolve_prompt("prompteol").format(text) == normal
    assert build_prompt("prompteol", reference_exact=True).format(text) == exact


# (text, expected with an STS instruction, expected with that instruction and reference_exact).
INSTRUCTION_CASES = [
    ("A cat sleeps", STS_FORMATTED + EOL.format("A cat sleeps."), EOL.format(STS_FORMATTED + "A cat sleeps.")),
    # The ending is checked before quotes become apostrophes: a closing quote counts as an ending.
    ('say "x"', STS_FORMATTED + EOL.format("say 'x'"), EOL.format(STS_FORMATTED + "say 'x'")),
    ("under_score!", STS_FORMATTED + EOL.format("under_score!"), EOL.format(STS_FORMATTED + "under score!")),
    # Their instruction makes the text non-empty, so the empty text gets the period after it.
    ("", STS_FORMATTED + EOL.format("."), EOL.format(STS_FORMATTED + ".")),
]


@pytest.mark.parametrize("text, normal, exact", INSTRUCTION_CASES)
def test_instruction_goes_before_the_prompt_or_inside_the_quotes(text, normal, exact):
    assert build_prompt("prompteol", instruction=STS).format(text) == normal
    assert build_prompt("prompteol", instruction=STS, reference_exact=True).format(text) == exact


def test_instruction_format_strips_trailing_colon_space_newline():
    assert format_instruction("Classify the comments: \n") == "<|user|>\nClassify the comments\n<|embed|>\n"
    assert format_instruction(STS) == STS_FORMATTED
    normal = build_prompt("none", instruction="Find snake_case names:")
    exact = build_prompt("none", instruction="Find snake_case names:", reference_exact=True)
    assert normal.format("a_b") == '<|user|>\nFind snake_case names\n<|embed|>\n"a_b."'
    assert exact.format("a_b") == '"<|user|>\nFind snake case names\n<|embed|>\na b."'


def test_none_preset_and_other_presets():
    assert build_prompt("none").format("Hi") == '"Hi."'
    assert build_prompt("none").format("") == '"."'
    assert build_prompt("none", reference_exact=True).format("") == '""'
    assert build_prompt("style").format("Hi") == 'In one word, describe the style of the following sentence - "Hi." :"'
    assert build_prompt("tone").format("Hi!") == (
        'In one word, describe the tone of the following sentence - "Hi!" (e.g., formal, informal, humorous, serious):'
    )
    assert build_prompt("grammar_structure").format("Hi") == (
        'In one word, describe the grammatical structure of the following sentence (simple, compound, complex) - "Hi." :'
    )
    assert set(PRESETS) == {
        "none", "prompteol", "style", "sentiment", "tone", "intent", "complexity", "subjectivity",
        "language_style", "grammar_structure",
    }
    for template in PRESETS.values():
        assert template.count("{text}") == 1


def test_user_templates_take_the_text_verbatim():
    template = 'Q: {text} A_"'
    assert resolve_prompt(template).format('no "period"_x') == 'Q: no "period"_x A_"'
    assert build_prompt(template, instruction=STS).format("x") == STS_FORMATTED + 'Q: x A_"'
    assert resolve_prompt(None) is None
    prompt = Prompt("<", ">")
    assert resolve_prompt(prompt) is prompt and prompt.format("x") == "<x>"


def test_bad_prompts_are_refused_naming_the_presets():
    for bad in ("promptEOL", "no placeholder", "{text} twice {text}"):
        with pytest.raises(ValueError, match="prompteol.*grammar_structure.*{text}"):
            resolve_prompt(bad)
    with pytest.raises(TypeError):
        resolve_prompt(3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from moee_fast.demo import build_demo_checkpoint

    return AutoTokenizer.from_pretrained(build_demo_checkpoint(str(tmp_path_factory.mktemp("demo"))))


@pytest.mark.parametrize("reference_exact", [False, True])
def test_truncation_keeps_preset_and_instruction(tokenizer, reference_exact):
    prompt = build_prompt("prompteol", instruction=STS, reference_exact=reference_exact)
    long_text = "A man is playing a guitar on the street. " * 20
    full = tokenizer(prompt.format(long_text))["input_ids"]
    limit = len(tokenizer(prompt.format(""))["input_ids"]) + 5
    assert len(full) > limit
    ids, truncated = tokenize(tokenizer, [long_text, "Short"], prompt, max_length=limit)
    assert truncated == 1 and len(ids[0]) <= limit
    decoded = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert decoded.endswith('" means in one word:"')
    assert "Retrieve semantically similar text." in decoded
    assert ids[1] == tokenizer(prompt.format("Short"))["input_ids"]


def test_reference_exact_strips_the_instruction_at_both_ends():
    """The authors' code strips `: \\n` from both ends of an instruction; the default path only
    trims its end."""
    instruction = ": \nFind snake_case names:\n"
    exact = build_prompt("prompteol", instruction=instruction, reference_exact=True)
    assert exact.format("x") == EOL.format("<|user|>\nFind snake case names\n<|embed|>\nx.")
    assert format_instruction(instruction, reference_exact=True) == "<|user|>\nFind snake_case names\n<|embed|>\n"
    normal = build_prompt("prompteol", instruction=instruction)
    assert normal.format("x") == "<|user|>\n: \nFind snake_case names\n<|embed|>\n" + EOL.format("x.")


@pytest.mark.parametrize("instruction", ["", ": \n"])
def test_reference_exact_empty_instruction_still_marks_the_text(instruction):
    """An empty instruction (the corpus side of a retrieval task in the authors' code) adds
    `<|embed|>\\n` under reference_exact, and nothing otherwise."""
    exact = build_prompt("prompteol", instruction=instruction, reference_exact=True)
    assert exact.format("A cat") == EOL.format("<|embed|>\nA cat.")
    assert exact.format("") == EOL.format("<|embed|>\n.")
    assert build_prompt("prompteol", instruction="").format("A cat") == EOL.format("A cat.")
    assert build_prompt("prompteol", instruction=None, reference_exact=True).format("A cat") == EOL.format("A cat.")
