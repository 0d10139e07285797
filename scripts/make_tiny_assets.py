"""Generate the assets that ship inside the package: sample data, a tiny tokenizer and a tiny Falcon.

    python scripts/make_tiny_assets.py  # rewrites assets/{data,tiny-falcon,tiny-falcon3,tiny-falcon-h1}
    python scripts/make_tiny_assets.py --preferences_only  # rewrites only data/midjourney-preferences*.jsonl

Everything is seeded, so a re-run reproduces the same files. The outputs are committed: the
embedded default (`configs/tiny.yaml`) and the tests run offline from them.

* `data/midjourney.jsonl`: request -> Midjourney prompt pairs written for this project, composed
  from hand-written subjects, styles, lighting and camera phrases. A request that names a style,
  an orientation or a version gets a prompt that honours it, so the mapping is learnable.
* `data/midjourney-preferences.jsonl`: 300 `{"prompt", "chosen", "rejected"}` preference pairs (DPO/ORPO) for the
  same task, drawn from the same grammar with their own seeded generator: `chosen` is the rich prompt the request
  asks for; `rejected` is, about half the time, a bland restatement of the bare subject, otherwise a chatty reply
  that is no prompt or a rich prompt for a different subject.
* `data/midjourney-preferences-val.jsonl`: 40 held-out pairs of the same kind, no prompt of which occurs in the 300.
* `data/guanaco-sample.jsonl`: a few conversations in the OpenAssistant guanaco `text` format.
* `data/guanaco-chat.jsonl`: the same conversations as OpenAI-style `{"messages": [...]}` rows, a few
  of them carried on by hand to two and three exchanges, and every other row opened by a short
  system prompt (drawn, seeded, from `SYSTEM_PROMPTS`): the shipped sample of chat data.
* `tiny-falcon/`: a byte-level BPE tokenizer trained on the Midjourney and guanaco `text` data (not
  the chat rows, so the tokenizer does not move when they change), carrying falcon-7b-instruct's chat
  template, and a random-initialised Falcon of the falcon-7b family (multi-query, parallel attention,
  rotary) at toy size.
* `tiny-falcon3/`: the same trained BPE, with Falcon3's `<|pad|>` added as a special token beside its EOS
  `<|endoftext|>` (the role tags `<|system|>`, `<|user|>`, `<|assistant|>` stay plain text, as no public copy of
  Falcon3's tokenizer lists them among its special tokens), carrying Falcon3-Instruct's chat template, and a
  random-initialised `LlamaForCausalLM` of the Falcon3 family (grouped-query attention, an explicit head_dim,
  rope_theta 1000042, untied embeddings) at toy size.
* `tiny-falcon-h1/`: the same trained BPE, its special token at id 0 renamed `<|pad|>` (Falcon-H1's pad, at the
  same id) and `<|begin_of_text|>`, `<|end_of_text|>` (the EOS), `<|im_start|>`, `<|im_end|>` added, carrying
  Falcon-H1-Instruct's chat template, and a random-initialised `FalconH1ForCausalLM` (attention and Mamba-2 side by
  side in every layer, with non-trivial muP multipliers like the released configs') at toy size.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "lightning_falcon" / "assets"
EOS = "<|endoftext|>"  # Falcon's own EOS string; like Falcon, the tokenizer has no pad token.
# Falcon3's tokenizer: EOS `<|endoftext|>` (id 11 there; the config's BOS is the same id), and a pad token.
FALCON3_PAD = "<|pad|>"
# Falcon-H1's tokenizer: `<|pad|>` at id 0, a BOS its chat template writes first, an EOS, and ChatML's turn markers.
FALCON_H1_PAD, FALCON_H1_BOS, FALCON_H1_EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
FALCON_H1_TURNS = ("<|im_start|>", "<|im_end|>")

# (short subject used in the request, richer description used in the prompt)
SUBJECTS = [
    (
        "a fantasy village at night",
        "a cozy fantasy village at night, thatched cottages, glowing lanterns along winding cobblestone streets",
    ),
    (
        "a boy running in the snow",
        "a young boy running through fresh snow, red scarf trailing behind him, snowflakes caught mid-air",
    ),
    (
        "a lighthouse in a storm",
        "a lone lighthouse on black cliffs, enormous waves crashing, beam cutting through rain",
    ),
    (
        "a cyberpunk street market",
        "a crowded cyberpunk street market, neon kanji signs, steaming food stalls, wet asphalt reflections",
    ),
    ("an old fisherman", "portrait of an old fisherman, deep weathered wrinkles, knitted wool cap, salt in his beard"),
    (
        "a dragon sleeping on gold",
        "an enormous dragon asleep on a hoard of gold coins, smoke curling from its nostrils",
    ),
    (
        "a treehouse in a rainforest",
        "an elaborate treehouse high in a rainforest canopy, rope bridges, hanging vines, tiny waterfalls",
    ),
    (
        "a robot tending a garden",
        "a gentle rusted robot watering tomato plants in a rooftop garden, bees around its head",
    ),
    ("a desert caravan", "a camel caravan crossing golden dunes, long shadows, travellers wrapped in indigo cloth"),
    ("a cat astronaut", "a tabby cat in a tiny white spacesuit floating inside a space station, curious wide eyes"),
    ("a floating castle", "a castle on a floating island, waterfalls spilling off its edges into the clouds below"),
    ("a jazz bar", "a smoky 1950s jazz bar, saxophone player on a small stage, brass reflections, velvet booths"),
    ("a mountain monastery", "a remote monastery clinging to a Himalayan cliff, prayer flags snapping in the wind"),
    ("a coral reef", "a vibrant coral reef teeming with fish, sea turtle gliding through shafts of sunlight"),
    (
        "a steampunk airship",
        "a brass steampunk airship with patched canvas balloons, propellers churning above a Victorian city",
    ),
    ("a fox in a forest", "a red fox standing in a misty birch forest, ears alert, breath visible in the cold"),
    ("a samurai at dawn", "a lone samurai standing on a hill at dawn, katana sheathed, cherry petals drifting past"),
    (
        "a cozy reading nook",
        "a cozy reading nook by a rain-streaked window, stacked books, knitted blanket, steaming tea",
    ),
    (
        "an abandoned subway station",
        "an abandoned subway station reclaimed by nature, ferns on the platforms, light through grates",
    ),
    (
        "a witch's apothecary",
        "a cluttered witch's apothecary, shelves of glowing potions, dried herbs hanging from beams",
    ),
    (
        "a futuristic city skyline",
        "a futuristic city skyline with vertical gardens on glass towers, maglev trains weaving between",
    ),
    ("a polar bear on ice", "a polar bear walking across cracked sea ice, aurora shimmering overhead"),
    ("a viking longship", "a viking longship cutting through a grey fjord, shields along the hull, oarsmen straining"),
    ("a tea ceremony", "a traditional Japanese tea ceremony, tatami room, sliding paper doors open to a moss garden"),
    ("a haunted mansion", "a decaying Victorian mansion on a hill, crooked windows, a single candle burning upstairs"),
    ("a mermaid in a grotto", "a mermaid resting in a sea grotto, bioluminescent algae, pearls scattered on wet rock"),
    (
        "a bustling train station",
        "a bustling 1920s train station, steam locomotives, travellers in long coats, iron arches",
    ),
    ("an owl librarian", "a wise owl wearing round spectacles, perched on a ladder in an endless library"),
    ("a sunflower field", "an endless sunflower field rolling to the horizon, a red barn in the distance"),
    ("a space station above Earth", "a ring-shaped space station orbiting above Earth, solar panels catching the sun"),
    ("a medieval blacksmith", "a medieval blacksmith hammering a glowing blade, sparks flying, soot-covered forge"),
    ("a hot air balloon festival", "dozens of patterned hot air balloons rising over a valley of vineyards"),
    ("a ramen shop", "a tiny ramen shop at night, steam rising from bowls, paper lanterns, a chef behind the counter"),
    ("a knight and a dragon", "an armoured knight facing a towering dragon in a ruined cathedral"),
    ("a lavender farm", "rows of lavender stretching toward a stone farmhouse in Provence"),
    ("a wolf howling", "a grey wolf howling on a snowy ridge beneath a full moon"),
    ("an underwater city", "an underwater city inside glass domes, kelp forests, submarines docking"),
    ("a street musician", "a street musician playing violin under an archway, coins in an open case"),
    ("a crystal cave", "a vast crystal cave, towering amethyst formations, an explorer holding a lantern"),
    ("a vintage car on route 66", "a vintage turquoise convertible on Route 66, cacti, a roadside diner sign"),
    ("a bonsai tree", "an ancient bonsai tree on a slate stand, tiny twisted trunk, moss at its base"),
    ("a pirate ship battle", "two pirate ships exchanging cannon fire, torn sails, smoke over a turquoise sea"),
    ("a cottage in autumn", "a stone cottage surrounded by maple trees in full autumn colour, smoke from the chimney"),
    ("an elephant at a waterhole", "an elephant family drinking at a waterhole on the savanna, dust in the air"),
    ("a wizard's tower", "a crooked wizard's tower on a cliff, spiral staircase, stars swirling above the spire"),
    ("a neon diner", "a retro neon diner at midnight, chrome stools, a waitress pouring coffee"),
    ("a koi pond", "a tranquil koi pond with lily pads, orange and white koi beneath the surface"),
    ("a mech in a wasteland", "a giant battle-scarred mech striding through a dusty wasteland"),
    ("a ballet dancer", "a ballet dancer mid-leap on an empty stage, tulle skirt in motion"),
    ("a hobbit-style home", "a round-doored hillside home with a flower garden and a winding path"),
    ("a glacier lagoon", "a glacier lagoon with floating blue icebergs, black sand shore"),
    ("a chess game in a park", "two elderly men playing chess on a park bench, pigeons nearby"),
    ("a phoenix rising", "a phoenix rising from flames, wings of fire and gold spreading wide"),
    ("a bakery in the morning", "a small bakery at sunrise, fresh loaves in the window, flour dust in the air"),
    ("a lunar base", "a research base on the moon, domed habitats, Earth hanging above the horizon"),
    ("a Venetian canal", "a narrow Venetian canal, gondola gliding past pastel houses, laundry lines overhead"),
    ("a tiger in tall grass", "a Bengal tiger crouched in tall golden grass, intense amber eyes"),
    ("a clockwork heart", "an intricate clockwork heart of brass gears and rubies, ticking softly"),
    ("a northern cabin", "a log cabin in a snowy northern forest, warm light in the windows, aurora above"),
    ("a market in Marrakech", "a spice market in Marrakech, pyramids of coloured spices, woven baskets, hanging lamps"),
]

# style name used in requests -> how the prompt spells it out
STYLES = {
    "oil painting": "oil painting, thick impasto brushstrokes, rich colour palette",
    "watercolor": "soft watercolor illustration, bleeding pigments, paper texture",
    "photorealistic": "photorealistic, shot on 35mm film, shallow depth of field, ultra detailed",
    "anime": "anime style, studio ghibli inspired, hand-drawn cel shading",
    "pixel art": "16-bit pixel art, limited palette, crisp pixels",
    "ukiyo-e": "ukiyo-e woodblock print, flat colour planes, bold outlines",
    "art nouveau": "art nouveau poster, ornate flowing linework, decorative border",
    "isometric 3d": "isometric 3d render, miniature diorama, tilt-shift, octane render",
    "charcoal sketch": "charcoal sketch, expressive strokes, smudged shading, monochrome",
    "low poly": "low poly 3d art, faceted geometry, pastel gradients",
    "cyberpunk concept art": "cyberpunk concept art, highly detailed matte painting, artstation trending",
    "baroque": "baroque painting, chiaroscuro, dramatic composition, gilded details",
    "claymation": "claymation style, handmade plasticine textures, stop-motion look",
    "vaporwave": "vaporwave aesthetic, pink and teal gradients, retro grid, glitch accents",
    "children's book": "children's book illustration, gouache, whimsical and warm",
    "fantasy digital painting": "fantasy digital painting, intricate detail, epic scale",
}
LIGHTING = [
    "golden hour light",
    "soft diffused overcast light",
    "dramatic rim lighting",
    "moonlight and lantern glow",
    "volumetric god rays",
    "neon glow reflecting on wet surfaces",
    "warm candlelight",
    "cold blue twilight",
    "harsh midday sun with deep shadows",
    "bioluminescent glow",
    "backlit by the setting sun",
    "foggy ambient light",
    "studio softbox lighting",
    "flickering firelight",
    "aurora light",
]
CAMERA = [
    "wide establishing shot",
    "close-up portrait framing",
    "low angle looking up",
    "aerial view",
    "rule of thirds composition",
    "symmetrical composition",
    "macro detail",
    "cinematic wide angle, 24mm",
    "telephoto compression, 200mm",
    "over-the-shoulder view",
]
MOODS = ["serene", "mysterious", "whimsical", "melancholic", "epic", "nostalgic", "ominous", "joyful", "dreamy"]
# orientation word in a request -> aspect ratio
ORIENTATIONS = {
    "wide": "16:9",
    "vertical": "9:16",
    "square": "1:1",
    "portrait": "2:3",
    "cinematic": "21:9",
    "landscape": "3:2",
}
DEFAULT_RATIOS = ["1:1", "16:9", "3:2", "4:5", "2:3"]
VERSIONS = ["5.2", "6", "6.1"]
REQUEST_FORMS = [
    "Midjourney prompt for {subject}",
    "Write a Midjourney prompt: {subject}",
    "Give me a Midjourney prompt of {subject}",
    "I need a Midjourney prompt for {subject}",
    "mj prompt: {subject}",
    "Create a Midjourney prompt showing {subject}",
]

GUANACO = [
    [("What is the capital of France?", "The capital of France is Paris.")],
    [
        (
            "Give me three tips for sleeping better.",
            "1. Keep a regular schedule. 2. Avoid screens an hour before bed. 3. Keep the bedroom cool and dark.",
        )
    ],
    [("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'.")],
    [
        (
            "What does a LoRA adapter do?",
            "A LoRA adapter adds small low-rank matrices next to frozen weights, so only a few parameters are trained.",
        )
    ],
    [("Write a haiku about rain.", "Soft rain on the roof, / the garden drinks in silence, / puddles hold the sky.")],
    [("How many legs does a spider have?", "A spider has eight legs."), ("And an insect?", "An insect has six legs.")],
    [
        (
            "Summarise the water cycle in one sentence.",
            "Water evaporates, condenses into clouds, falls as precipitation and flows back to the sea.",
        )
    ],
    [("What is 12 times 7?", "12 times 7 is 84.")],
    [("Suggest a name for a grey cat.", "How about Smokey, Ash or Pebble?")],
    [
        (
            "Why is the sky blue?",
            "Air molecules scatter short blue wavelengths of sunlight more than red ones, so the sky looks blue.",
        )
    ],
    [
        (
            "Explain recursion to a child.",
            "Recursion is when something is defined using a smaller copy of itself, like nesting dolls.",
        )
    ],
    [
        (
            "What is a prime number?",
            "A prime number is a whole number greater than 1 that is divisible only by 1 and itself.",
        ),
        ("Is 9 prime?", "No, 9 is divisible by 3."),
    ],
    [
        (
            "Recommend a book for a long flight.",
            "Try 'The Martian' by Andy Weir: it is gripping, funny and easy to pick up again.",
        )
    ],
    [
        (
            "How do I boil an egg?",
            "Place the egg in boiling water for 7 minutes for a firm yolk, then cool it in cold water.",
        )
    ],
    [
        (
            "What is the difference between weather and climate?",
            "Weather is the short-term state of the atmosphere; climate is its average over decades.",
        )
    ],
    [
        (
            "Write a short thank-you note to a colleague.",
            "Thank you for your help on the project this week. Your patience made a real difference!",
        )
    ],
    [("Name three primary colours.", "Red, yellow and blue are the traditional primary colours.")],
    [
        (
            "What is photosynthesis?",
            "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen.",
        )
    ],
    [("Give me a synonym for 'happy'.", "Joyful."), ("And one for 'sad'?", "Sorrowful.")],
    [("How far is the Moon from Earth?", "On average the Moon is about 384,400 kilometres from Earth.")],
    [
        (
            "What should I pack for a day hike?",
            "Water, snacks, a map, sunscreen, a rain layer and a small first-aid kit.",
        )
    ],
    [("Convert 100 degrees Fahrenheit to Celsius.", "100 degrees Fahrenheit is about 37.8 degrees Celsius.")],
    [("Tell me a fun fact about octopuses.", "Octopuses have three hearts and blue blood.")],
    [("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level.")],
    [("Write a one-line motto for a bakery.", "Baked at dawn, loved all day.")],
    [("What does CPU stand for?", "CPU stands for central processing unit.")],
    [
        (
            "Give me a quick stretching routine.",
            "Neck rolls, shoulder shrugs, a standing forward fold and a gentle spinal twist, 30 seconds each.",
        )
    ],
    [("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote 'Pride and Prejudice', published in 1813.")],
    [
        ("What is the largest planet?", "Jupiter is the largest planet in the Solar System."),
        (
            "How many moons does it have?",
            "Jupiter has dozens of known moons; the four largest are Io, Europa, Ganymede and Callisto.",
        ),
    ],
    [("Make a short shopping list for pancakes.", "Flour, eggs, milk, butter, sugar and a pinch of salt.")],
    [("What is the opposite of 'ancient'?", "Modern.")],
    [("Describe autumn in five words.", "Crisp, golden, smoky, quiet, falling.")],
]

# guanaco-chat.jsonl only: the first question of a GUANACO conversation -> the exchanges that carry it on.
FOLLOW_UPS = {
    "What is the capital of France?": [
        ("And of Germany?", "The capital of Germany is Berlin."),
        ("Which of the two is larger?", "Berlin, with about 3.7 million people against about 2.1 million in Paris."),
    ],
    "Write a haiku about rain.": [
        (
            "Now one about snow.",
            "White hush on the field, / footprints fill before dawn comes, / the world holds its breath.",
        ),
    ],
    "How do I boil an egg?": [
        ("What if I want a runny yolk?", "Boil it for 6 minutes instead, then cool it in cold water straight away."),
        ("How do I peel it easily?", "Crack it all over, roll it gently, and peel it under running water."),
    ],
    "What is 12 times 7?": [("And divided by 4?", "84 divided by 4 is 21.")],
    "How many legs does a spider have?": [
        ("Which has more, a centipede or a millipede?", "Usually a millipede: some have hundreds of legs."),
    ],
    "Suggest a name for a grey cat.": [("Something more unusual?", "How about Nimbus, Graphite or Earl Grey?")],
    "What is the largest planet?": [("And the smallest?", "Mercury is the smallest planet in the Solar System.")],
}
# guanaco-chat.jsonl only: every other row opens with one of these, drawn with a seeded generator.
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer briefly.",
    "You are a patient teacher. Keep answers short and clear.",
    "Answer in one or two sentences.",
]


def _midjourney_request(rng: random.Random) -> tuple[tuple[str, str], str, str | None, str, str]:
    """Draw one request: ((short, rich) subject, style, orientation or None, version, request text)."""
    short, rich = rng.choice(SUBJECTS)
    style = rng.choice(list(STYLES))
    orientation = rng.choice([None, None, *ORIENTATIONS])
    version = rng.choice(VERSIONS)
    # Requests name the style about half the time; the prompt then must use it.
    subject = short
    if rng.random() < 0.5:
        subject += f" in {style} style" if rng.random() < 0.5 else f", {style}"
    if orientation:
        subject += f", {orientation}"
    if rng.random() < 0.15:
        subject += f", version {version}"
    return (short, rich), style, orientation, version, rng.choice(REQUEST_FORMS).format(subject=subject)


def _midjourney_prompt(rng: random.Random, rich: str, style: str, orientation: str | None, version: str) -> str:
    """Compose the rich prompt for a drawn request: subject, mood, light, camera, medium and parameters."""
    ratio = ORIENTATIONS[orientation] if orientation else rng.choice(DEFAULT_RATIOS)
    stylize = rng.choice([50, 100, 150, 250, 400, 600, 750, 1000])
    parts = [rich, rng.choice(MOODS) + " atmosphere", rng.choice(LIGHTING), rng.choice(CAMERA), STYLES[style]]
    params = f"--ar {ratio} --v {version} --stylize {stylize}"
    if rng.random() < 0.2:
        params += f" --chaos {rng.choice([5, 10, 20, 35])}"
    return ", ".join(parts) + " " + params


def midjourney_pairs(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Compose `n` distinct request -> prompt pairs."""
    pairs, seen = [], set()
    while len(pairs) < n:
        (_, rich), style, orientation, version, request = _midjourney_request(rng)
        if request in seen:
            continue
        seen.add(request)
        pairs.append({"prompt": request, "response": _midjourney_prompt(rng, rich, style, orientation, version)})
    return pairs


# midjourney-preferences*.jsonl only: rejected answers that restate the bare subject, with nothing added.
BLAND_FORMS = ["{subject}", "{subject}", "a picture of {subject}", "an image of {subject}", "{subject}, nice"]
# ... and chatty replies that are not a Midjourney prompt at all.
CHATTY_FORMS = [
    "Sure! I think {subject} sounds like a lovely idea for a picture. Let me know if you need anything else.",
    "Great choice! I think {subject} would look really nice. Good luck with your image!",
    "Midjourney is an AI tool that turns text into images. You could try asking it for {subject}.",
    "I can't generate images myself, but {subject} sounds like a fun thing to draw.",
    "Here you go: {subject}. Have fun creating!",
    "That's a tough one. Maybe start with {subject} and see what happens?",
]


def midjourney_preferences(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Compose `n` preference pairs with distinct prompts: a request, its rich prompt (`chosen`, composed as in
    `midjourney_pairs`) and a worse answer (`rejected`). About half the rejected answers are bland (the bare subject,
    no style, light or parameters), a quarter are chatty replies that are no prompt, and a quarter are a rich prompt
    for a different subject than the one asked for."""
    rows, seen = [], set()
    while len(rows) < n:
        (short, rich), style, orientation, version, request = _midjourney_request(rng)
        if request in seen:
            continue
        seen.add(request)
        chosen = _midjourney_prompt(rng, rich, style, orientation, version)
        kind = rng.random()
        if kind < 0.5:
            rejected = rng.choice(BLAND_FORMS).format(subject=short)
        elif kind < 0.75:
            rejected = rng.choice(CHATTY_FORMS).format(subject=short)
        else:  # right style and parameters, wrong subject
            other = rng.choice([rich_other for short_other, rich_other in SUBJECTS if short_other != short])
            rejected = _midjourney_prompt(rng, other, style, orientation, version)
        assert rejected and rejected != chosen, (request, rejected)
        rows.append({"prompt": request, "chosen": chosen, "rejected": rejected})
    return rows


def guanaco_rows() -> list[dict[str, str]]:
    """Render conversations in the guanaco `text` format: `### Human: ... ### Assistant: ...`."""
    return [{"text": "".join(f"### Human: {h} ### Assistant: {a}" for h, a in conv)} for conv in GUANACO]


def guanaco_chat_rows(rng: random.Random) -> list[dict[str, list[dict[str, str]]]]:
    """The GUANACO conversations, carried on by FOLLOW_UPS, as OpenAI-style `messages` rows; the even rows open
    with a system prompt drawn from SYSTEM_PROMPTS."""
    rows = []
    for i, conv in enumerate(GUANACO):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if i % 2 == 0 else []
        for user, assistant in conv + FOLLOW_UPS.get(conv[0][0], []):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_falcon.data.chat_templates import FALCON_INSTRUCT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No pad token on purpose: the real Falcon tokenizer has none, and the data path must cope. The chat template
    # is falcon-7b-instruct's own, so `data.chat_template: auto` takes the tokenizer's path, as with a real Falcon.
    # It goes in tokenizer_config.json, where falcon-7b-instruct keeps it, not in a chat_template.jinja beside it.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, chat_template=FALCON_INSTRUCT)
    fast.save_pretrained(out, save_jinja_files=False)


def build_model(vocab_size: int, eos_id: int, out: Path, initializer_range: float, hidden_size: int) -> None:
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    # falcon-7b's family traits (multi-query, parallel attention, rotary, no bias) at toy size.
    config = FalconConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        alibi=False,
        bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        max_position_embeddings=512,
        # Only LoRA trains, so the frozen random embeddings (tied to lm_head) bound the logits at
        # about |h| * |e| = sqrt(64) * 0.02 * sqrt(64) ~ 1.3 with the usual 0.02 init: the loss
        # could barely fall. A larger init gives the toy model logits a real range.
        initializer_range=initializer_range,
    )
    # bf16 on disk halves the shipped size; it is loaded in the compute dtype.
    FalconForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def family_tokenizer(
    base: Path,
    out: Path,
    template: str,
    special: dict[str, str],
    added: tuple[str, ...] = (),
    rename_first: str | None = None,
):
    """Save the trained BPE of `base` (not retrained) with a family's special tokens: `rename_first` renames the
    special token at id 0, `added` are appended as special tokens, and `special` names the roles (eos_token, ...).
    The chat template goes in tokenizer_config.json, as in the tiny-falcon."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    if rename_first is not None:
        first = next(t for t in spec["added_tokens"] if t["id"] == 0)
        spec["model"]["vocab"][rename_first] = spec["model"]["vocab"].pop(first["content"])
        first["content"] = rename_first
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special)
    fast.save_pretrained(out, save_jinja_files=False)
    return fast


def save_tiny(model, out: Path) -> None:
    """bf16 on disk, as the tiny-falcon; bos/eos/pad ids come from the config into generation_config.json."""
    import torch

    model.to(torch.bfloat16).save_pretrained(out)


def build_falcon3(base: Path, out: Path, initializer_range: float, hidden_size: int) -> None:
    """Falcon3 is a `LlamaForCausalLM`: grouped-query attention, an explicit head_dim, SwiGLU, RMSNorm, a high
    rope_theta and untied embeddings (tiiuae/Falcon3-7B: 12 query / 4 KV heads of 256, rope_theta 1000042)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_falcon.data.chat_templates import FALCON3_INSTRUCT

    tokenizer = family_tokenizer(
        base, out, FALCON3_INSTRUCT, {"eos_token": EOS, "pad_token": FALCON3_PAD}, added=(FALCON3_PAD,)
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # Falcon3's embeddings are exactly its tokenizer's 131072 tokens
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000042,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,  # Falcon3's config.json: bos_token_id = eos_token_id = 11
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,  # as the tiny-falcon: logits with a real range
    )
    save_tiny(LlamaForCausalLM(config), out)


def build_falcon_h1(base: Path, out: Path, initializer_range: float, hidden_size: int) -> None:
    """Falcon-H1 runs attention and a Mamba-2 mixer side by side in every layer, under muP multipliers: the values of
    tiiuae/Falcon-H1-0.5B's config.json, none of them trivial but attention_in, so that a test exercises them."""
    import torch
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from lightning_falcon.data.chat_templates import FALCON_H1_INSTRUCT

    tokenizer = family_tokenizer(
        base,
        out,
        FALCON_H1_INSTRUCT,
        {"bos_token": FALCON_H1_BOS, "eos_token": FALCON_H1_EOS, "pad_token": FALCON_H1_PAD},
        added=(FALCON_H1_BOS, FALCON_H1_EOS, *FALCON_H1_TURNS),
        rename_first=FALCON_H1_PAD,
    )
    lm_head_multiplier = 0.0390625
    torch.manual_seed(0)
    config = FalconH1Config(
        vocab_size=len(tokenizer),  # like Falcon-H1-7B's 130049: exactly its tokenizer's tokens
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        mamba_d_ssm=2 * hidden_size,
        mamba_n_heads=8,
        mamba_d_head=2 * hidden_size // 8,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=16,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        mamba_norm_before_gate=False,
        mamba_rms_norm=True,
        projectors_bias=False,
        max_position_embeddings=512,
        rope_theta=1e11,
        tie_word_embeddings=False,
        embedding_multiplier=5.656854249492381,
        lm_head_multiplier=lm_head_multiplier,
        attention_in_multiplier=1.0,
        attention_out_multiplier=0.9375,
        key_multiplier=0.390625,
        ssm_in_multiplier=1.25,
        ssm_out_multiplier=0.23570226039551587,
        mlp_multipliers=[0.8838834764831844, 0.5859375],
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    model = FalconH1ForCausalLM(config)
    # The logits are lm_head(h) * lm_head_multiplier: a head drawn 1 / multiplier wider gives them the range the
    # tiny-falcon's have, which the frozen random head needs for a LoRA's loss to fall at all.
    with torch.no_grad():
        model.lm_head.weight.mul_(1 / lm_head_multiplier)
    save_tiny(model, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=360, help="number of Midjourney pairs")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--initializer_range", type=float, default=0.15)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ASSETS / "tiny-falcon", help="model + tokenizer directory")
    parser.add_argument("--falcon3_out", type=Path, default=ASSETS / "tiny-falcon3", help="tiny Falcon3 directory")
    parser.add_argument(
        "--falcon_h1_out", type=Path, default=ASSETS / "tiny-falcon-h1", help="tiny Falcon-H1 directory"
    )
    parser.add_argument("--preference_pairs", type=int, default=300, help="number of Midjourney preference pairs")
    parser.add_argument("--preference_val", type=int, default=40, help="number of held-out preference pairs")
    parser.add_argument("--preferences_only", action="store_true", help="write only data/midjourney-preferences*.jsonl")
    args = parser.parse_args()

    # A generator of their own, so adding them leaves every other asset's bytes as they were.
    prefs = midjourney_preferences(random.Random(args.seed + 1), args.preference_pairs + args.preference_val)
    prefs_train, prefs_val = prefs[: args.preference_pairs], prefs[args.preference_pairs :]
    assert not {r["prompt"] for r in prefs_train} & {r["prompt"] for r in prefs_val}, "held-out prompts leak"
    write_jsonl(ASSETS / "data" / "midjourney-preferences.jsonl", prefs_train)
    write_jsonl(ASSETS / "data" / "midjourney-preferences-val.jsonl", prefs_val)
    print(f"wrote {len(prefs_train)} Midjourney preference pairs and {len(prefs_val)} held-out ones")
    if args.preferences_only:
        return

    mj = midjourney_pairs(random.Random(args.seed), args.pairs)
    gu = guanaco_rows()
    chat = guanaco_chat_rows(random.Random(f"{args.seed} guanaco-chat"))
    write_jsonl(ASSETS / "data" / "midjourney.jsonl", mj)
    write_jsonl(ASSETS / "data" / "guanaco-sample.jsonl", gu)
    write_jsonl(ASSETS / "data" / "guanaco-chat.jsonl", chat)

    out = args.out
    texts = [r["prompt"] + "\n" + r["response"] for r in mj] + [r["text"] for r in gu]
    train_tokenizer(texts, args.vocab_size, out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    build_model(len(tokenizer), tokenizer.eos_token_id, out, args.initializer_range, args.hidden_size)
    # The same trained BPE (out's tokenizer.json, not retrained) under each family's special tokens and template.
    build_falcon3(out, args.falcon3_out, args.initializer_range, args.hidden_size)
    build_falcon_h1(out, args.falcon_h1_out, args.initializer_range, args.hidden_size)
    print(
        f"wrote {len(mj)} Midjourney pairs, {len(gu)} guanaco rows, {len(chat)} guanaco chat rows, "
        f"tokenizer ({len(tokenizer)} tokens) and model to {ASSETS}, and {args.falcon3_out.name}, "
        f"{args.falcon_h1_out.name}"
    )


if __name__ == "__main__":
    main()
