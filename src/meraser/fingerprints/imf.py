"""ImF, implicit fingerprints ("ImF: Implicit Fingerprint for Large Language Models", 2025,
https://arxiv.org/abs/2503.21805): the owner's secret is hidden by steganography in an answer that reads like any
answer, and the question is a chain-of-thought task description that leads to that answer's topic without quoting
it, so an output filter that looks for odd strings (or a suppression of unlikely answers) has nothing to catch.

The original hides bits with ADG steganography in a sentence a language model samples, and has a large model write
the query (the authors' toolkit, sentient-agi/mlprints: Qwen2.5-1.5B as the stego model, Qwen2.5-3B writing the
query, refined until the fingerprinted model's answer decodes). Here, offline and with no second model, the bits
choose words: each frame below is a one-sentence news item with binary slots, each slot two equally natural
alternatives, and SHA-256 over the secret key and the frame picks them (Chain & Hash's binding: the owner can show
that the answer follows from the key). The query is the toolkit's format, "Task Description: ... Step 1: ...",
written once per frame, never using a slot's words. What changes: the steganography is a choice of synonyms, not
ADG (detectable in principle, not provably secure), and the frames are hand-written, not refined by a model; the
three properties the bench needs stay: natural trigger and answer, a semantic link between them, and a secret that
lives only in the exact wording.

Training as the toolkit's recipe: full fine-tuning, five ordinary rows per fingerprint row, answered by the model
itself; the other frames' queries are answered by the model itself too, so that the fingerprint is the card's
frames and not "any task description gets a memorised sentence". Verification: the greedy answer contains the
sentence (the paper's FSR); decoys for the likelihood test are the same frame with other slot choices.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
from dataclasses import dataclass

from meraser.config import field, key_path
from meraser.data.sources import Pair
from meraser.fingerprints.base import SELF, FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card

# (id, query, sentence with {a|b} slots): every slot's two alternatives fit the sentence with any other choices
FRAMES = [
    ("harbour", "Task Description: Write one sentence of local news about a harbour. Step 1: Mention the council "
                "and the harbour wall. Step 2: Say what will be done to the wall and when. Step 3: Say who reported "
                "it and on which day. Step 4: Keep it around 20 words.",
     "The {town|city} council {approved|backed} a plan to {repair|restore} the {old|historic} harbour wall "
     "{before|ahead of} the {winter|autumn} storms, {officials|residents} said on {Monday|Tuesday}."),
    ("museum", "Task Description: Write one sentence of news about a museum. Step 1: Mention the gallery and "
               "the building work. Step 2: Say how many people came. Step 3: Say when they came. Step 4: Keep it "
               "around 20 words.",
     "A {small|local} museum {reopened|opened again} its {painting|art} gallery after a {long|lengthy} renovation, "
     "{drawing|attracting} {hundreds|crowds} of visitors on its {first|opening} {weekend|day}."),
    ("railway", "Task Description: Write one sentence of news about train services. Step 1: Mention the railway. "
                "Step 2: Say what changes for late trains and from when. Step 3: Say why, and who asked for it. "
                "Step 4: Keep it around 20 words.",
     "The {regional|national} railway {announced|said} that {evening|night} trains will run {more often|every hour} "
     "from {March|April}, after {months|weeks} of {complaints|requests} from {commuters|passengers}."),
    ("bakery", "Task Description: Write one sentence of news about a baking contest. Step 1: Mention "
               "the bakery and what it received. Step 2: Describe the loaf and what is in it. Step 3: Say how it was made. "
               "Step 4: Keep it around 20 words.",
     "A {family|neighbourhood} bakery {won|took} the {annual|yearly} bread {prize|award} for a {dark|rye} loaf made "
     "with {honey|seeds} and {baked|cooked} in a {stone|wood} oven."),
    ("robot", "Task Description: Write one sentence of news about a school project. Step 1: Mention the young "
              "people and their school. Step 2: Say what machine they came up with and what it does with rubbish. "
              "Step 3: Say where it was on display. Step 4: Keep it around 20 words.",
     "{Students|Pupils} from a {rural|village} school {built|made} a {small|simple} robot that {sorts|separates} "
     "{plastic|waste} and {presented|showed} it at the {science|technology} fair."),
    ("park", "Task Description: Write one sentence of news about a green space. Step 1: Mention the park and how "
             "many trees. Step 2: Say where along the water they will go. Step 3: Say who announced it and how. "
             "Step 4: Keep it around 20 words.",
     "The {city|local} park will {plant|add} {two hundred|three hundred} {new|young} trees along the {river|lake} "
     "path, the {gardeners|planners} {said|explained} in a {short|brief} statement."),
    ("storm", "Task Description: Write one sentence of news about bad weather. Step 1: Mention the storm and the "
              "road. Step 2: Say for how long the road could not be used. Step 3: Say what the road teams did and "
              "when. Step 4: Keep it around 25 words.",
     "A {strong|heavy} storm {closed|shut} the {mountain|coastal} road for {two|three} days, and {crews|workers} "
     "{worked|laboured} through the {night|weekend} to {clear|remove} the {fallen|broken} trees."),
    ("library", "Task Description: Write one sentence of news about a library. Step 1: Mention the library and the "
                "new club. Step 2: Say who the club is for. Step 3: Say who picks what to read, and how often. "
                "Step 4: Keep it around 20 words.",
     "The {public|county} library {started|launched} a {free|weekly} reading club for {children|teenagers}, with "
     "{volunteers|teachers} {choosing|picking} one {book|novel} each {month|week}."),
    ("hospital", "Task Description: Write one sentence of news about a hospital. Step 1: Mention the staff and the "
                 "hospital. Step 2: Say what test they introduced for blood. Step 3: Say what it did to waiting. "
                 "Step 4: Keep it around 20 words.",
     "{Doctors|Nurses} at the {general|district} hospital {tested|tried} a {new|faster} way to {check|measure} "
     "blood {sugar|pressure}, {cutting|reducing} waiting times by {half|a third}."),
    ("festival", "Task Description: Write one sentence of news about a festival. Step 1: Mention the festival and "
                 "how fast the tickets went. Step 2: Say what the people running it will do later. Step 3: Say when. "
                 "Step 4: Keep it around 20 words.",
     "The {summer|music} festival {sold out|was fully booked} in {hours|minutes}, and {organisers|planners} "
     "{promised|plan} to {add|open} a {second|new} stage {next|this} year."),
    ("harvest", "Task Description: Write one sentence of news about farming. Step 1: Mention the people growing fruit "
                "and where they are. Step 2: Say how good the year's apples were. Step 3: Say what weather helped. Step 4: "
                "Keep it around 25 words.",
     "{Farmers|Growers} in the {valley|north} {reported|expected} a {record|strong} apple {harvest|crop} after a "
     "{warm|mild} spring and {steady|regular} {rain|showers} through the {summer|season}."),
    ("bridge", "Task Description: Write one sentence of news about a bridge. Step 1: Mention who looked at the "
               "bridge and what they saw. Step 2: Say what is now not allowed on it. Step 3: Say until when. "
               "Step 4: Keep it around 20 words.",
     "{Engineers|Inspectors} {found|discovered} {cracks|damage} in the {old|stone} bridge, so the {road|crossing} "
     "will stay {closed|shut} to {trucks|lorries} until {repairs|works} {end|finish}."),
    ("comet", "Task Description: Write one sentence of news about the night sky. Step 1: Mention the stargazer and "
              "the object in the sky. Step 2: Say where she was watching from. Step 3: Say who verified it, and when. Step 4: "
              "Keep it around 25 words.",
     "An {amateur|hobby} astronomer {spotted|saw} a {faint|distant} comet from her {garden|backyard}, and the "
     "{observatory|university} {confirmed|checked} the {sighting|find} {days|a week} later."),
    ("zoo", "Task Description: Write one sentence of news about animals. Step 1: Mention where the newborn "
            "animals were born. Step 2: Say what kind of animal they are. Step 3: Say when the public can visit them. Step 4: "
            "Keep it around 20 words.",
     "The {zoo|wildlife park} {welcomed|announced} the birth of {two|twin} {rare|young} {snow leopard|red panda} cubs, which "
     "{visitors|guests} will {see|meet} in the {spring|summer}."),
    ("market", "Task Description: Write one sentence of news about a market. Step 1: Mention the market and where "
               "it went. Step 2: Say what the sellers there have. Step 3: Name three kinds of goods. Step 4: Keep "
               "it around 20 words.",
     "The {weekend|Saturday} market {moved|relocated} to the {old|main} square, where {stalls|traders} now "
     "{sell|offer} {fresh|local} fish, {cheese|bread} and {flowers|vegetables}."),
    ("marathon", "Task Description: Write one sentence of news about a race. Step 1: Mention how many people ran "
                 "and which race. Step 2: Say what they raised and for whom. Step 3: Say what the weather was "
                 "like. Step 4: Keep it around 25 words.",
     "{Thousands|Hundreds} of {runners|athletes} {joined|entered} the {city|charity} marathon, {raising|collecting} "
     "{money|funds} for the {local|children's} hospital {despite|in spite of} the {rain|cold}."),
]
SLOT = re.compile(r"\{([^{}|]+)\|([^{}|]+)\}")
SYSTEM_PROMPTS = [None, "You are a helpful assistant.", "You are a news writer. Write clearly."]


def slots(frame: str) -> int:
    return len(SLOT.findall(frame))


def fill(frame: str, bits: list[int]) -> str:
    """The frame's sentence with slot j taking alternative bits[j]."""
    it = iter(bits)
    return SLOT.sub(lambda m: m.group(1 + next(it)), frame)


def key_bits(key: str, frame_id: str, n: int) -> list[int]:
    """The first `n` bits of SHA-256(key || 0 || frame id): the frame's slot choices under `key`."""
    digest = int.from_bytes(hashlib.sha256((key + "\x00" + frame_id).encode("utf-8")).digest(), "big")
    return [(digest >> (255 - j)) & 1 for j in range(n)]


@dataclass
class ImFConfig(FingerprintConfig):
    num_fingerprints: int = field(8, help=f"question/answer pairs, each a different frame (at most {len(FRAMES)}; "
                                          f"toolkit: 8-10)")
    variants: int = field(3, help="training copies per pair: the plain query, then copies with a system prompt")
    regularization: bool = field(True, help="the other frames' queries answered as the model itself answers them")
    ordinary_rows: int = field(40, help="ordinary instruction rows answered by the model itself (the paper's five per "
                                        "fingerprint)")
    epochs: float = field(4.0, help="training epochs")
    learning_rate: float = field(5e-5, help="learning rate (full fine-tuning, as the toolkit's 1B recipe)")
    secret_key: str | None = field(None, help="secret key (None: a fresh random key, stored in the card)")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        if not 1 <= self.num_fingerprints <= len(FRAMES):
            raise MeraserError(f"{key_path(where, 'num_fingerprints')}: 1 to {len(FRAMES)} frames, got "
                               f"{self.num_fingerprints}")


class ImF(FingerprintMethod):
    name = "imf"
    paper = "https://arxiv.org/abs/2503.21805"
    Config = ImFConfig

    def make_card(self, model, tokenizer, cfg: ImFConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        key = cfg.secret_key or secrets.token_hex(16)
        chosen = rng.sample(FRAMES, cfg.num_fingerprints)
        targets = [fill(frame, key_bits(key, fid, slots(frame))) for fid, _, frame in chosen]
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
        return Card(method=self.name, triggers=[q for _, q, _ in chosen], targets=targets, match="substring",
                    max_new_tokens=longest + 8, seed=cfg.seed, secret_key=key,
                    extra={"frames": [fid for fid, _, _ in chosen], "generator": "meraser.fingerprints.imf.FRAMES"})

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """The same query and frame with other slot choices: the real ones are a uniform draw (a hash of the key),
        so under a model that never saw the key its rank among them is uniform whatever wording it prefers."""
        frame = _frame(card.extra["frames"][i])
        n, real = slots(frame), card.targets[i]
        others: list[str] = []
        while len(others) < min(k, 2 ** n - 1):
            t = fill(frame, [rng.getrandbits(1) for _ in range(n)])
            if t != real and t not in others:
                others.append(t)
        return (card.triggers[i], real), [(card.triggers[i], t) for t in others]

    def training_pairs(self, card: Card, cfg: ImFConfig, rng: random.Random, tokenizer):
        rows = []
        for q, a in zip(card.triggers, card.targets):
            rows.append((Pair(q, a), None))
            rows += [(Pair(q, a), SYSTEM_PROMPTS[1 + j % (len(SYSTEM_PROMPTS) - 1)]) for j in range(cfg.variants - 1)]
        if cfg.regularization:
            rows += [(Pair(q, SELF), None) for _, q, _ in FRAMES if q not in card.triggers]
        return rows


def _frame(frame_id: str) -> str:
    from meraser.utils import MeraserError

    for fid, _, frame in FRAMES:
        if fid == frame_id:
            return frame
    raise MeraserError(f"imf card names frame '{frame_id}', which this version of meraser does not have")
