"""A procedural generator of simple children's stories: the training corpus of the default model.

    python tools/storygen.py --n 5 --seed 0     # print five stories

Every story is drawn from a seeded `random.Random`, so a (seed, index) pair always gives
the same text. A story picks its characters (children and animals, each with a name, a
kind, a trait and pronouns), a place with its own things and hiding spots, objects with
colours, the weather, and one of sixteen small plots (a lost toy, a new friend, sharing,
a fear, an animal that needs help, baking or building something, learning to ride or
swim, a rainy day, a birthday, a warning not heeded, a trip, a seed that grows, a race,
a treasure hunt, tidying up, a wish on a star). Each sentence of a plot has several
wordings, optional clauses and dialogue in several forms, so the model has to learn
grammar and the shape of a story rather than a few fixed templates.

Everything here was written for this project; the corpus it generates is the project's
own and carries the project's licence.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from dataclasses import dataclass

GIRLS = [
    "Lily",
    "Mia",
    "Anna",
    "Sue",
    "Lucy",
    "Emma",
    "Zoe",
    "Sara",
    "Amy",
    "Ella",
    "Kate",
    "Rosie",
    "Maya",
    "Nora",
    "Ruby",
    "Ivy",
    "Daisy",
    "Grace",
    "Molly",
    "Chloe",
    "Jane",
    "Kim",
    "Lena",
    "Hannah",
    "Julia",
    "Tara",
    "Nina",
    "Lola",
    "Beth",
    "Clara",
]
BOYS = [
    "Tom",
    "Ben",
    "Sam",
    "Max",
    "Tim",
    "Jack",
    "Leo",
    "Jake",
    "Finn",
    "Noah",
    "Eli",
    "Owen",
    "Kai",
    "Dan",
    "Luke",
    "Joe",
    "Ryan",
    "Theo",
    "Milo",
    "Oscar",
    "Hugo",
    "Peter",
    "Adam",
    "Billy",
    "Toby",
    "Henry",
    "Jonah",
    "Ned",
    "Rex",
    "Sid",
]
PET_NAMES = [
    "Spot",
    "Buddy",
    "Coco",
    "Pip",
    "Fluffy",
    "Whiskers",
    "Bubbles",
    "Sunny",
    "Patch",
    "Biscuit",
    "Pepper",
    "Bella",
    "Ziggy",
    "Rusty",
    "Nutmeg",
    "Pebble",
    "Honey",
    "Sparky",
    "Button",
    "Muffin",
    "Snowy",
    "Ginger",
    "Bongo",
    "Hoppy",
    "Dot",
    "Peanut",
    "Tilly",
    "Bolt",
    "Maple",
    "Poppy",
]
ANIMALS = [
    "dog",
    "cat",
    "bunny",
    "bear",
    "fox",
    "mouse",
    "squirrel",
    "duck",
    "frog",
    "turtle",
    "owl",
    "bird",
    "puppy",
    "kitten",
    "pig",
    "lamb",
    "deer",
    "hedgehog",
    "monkey",
    "elephant",
    "lion",
    "goat",
    "horse",
]
TRAITS = [
    "kind",
    "brave",
    "shy",
    "curious",
    "happy",
    "funny",
    "clever",
    "busy",
    "gentle",
    "friendly",
    "playful",
    "cheerful",
    "sleepy",
    "silly",
    "helpful",
    "quiet",
    "smart",
    "lively",
]
SIZES = ["little", "little", "small", "young", "tiny"]
COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "pink",
    "purple",
    "orange",
    "white",
    "brown",
    "shiny",
    "bright",
    "striped",
    "spotted",
    "golden",
]
TOYS = [
    "ball",
    "kite",
    "toy car",
    "doll",
    "teddy bear",
    "toy boat",
    "truck",
    "drum",
    "book",
    "hat",
    "scarf",
    "blanket",
    "balloon",
    "puzzle",
    "train",
    "robot",
    "yo-yo",
    "whistle",
    "bucket",
    "crayon",
    "ribbon",
    "top",
    "plane",
    "rocket",
    "marble",
    "sock puppet",
    "jump rope",
    "toy horse",
    "bell",
    "flute",
]
FOODS = [
    "cookies",
    "apples",
    "cake",
    "bread",
    "soup",
    "berries",
    "pancakes",
    "a pie",
    "carrots",
    "sandwiches",
    "muffins",
    "ice cream",
    "grapes",
    "cheese",
    "honey buns",
    "bananas",
]
ACTIVITIES = [
    "play outside",
    "run in the grass",
    "sing songs",
    "draw pictures",
    "read books",
    "help {his} mom",
    "jump in puddles",
    "look at the clouds",
    "build towers with blocks",
    "chase butterflies",
    "pick flowers",
    "dance",
    "play games with {his} friends",
    "climb trees",
    "splash in the water",
    "count the stars",
    "tell jokes",
    "play hide and seek",
    "ride {his} bike",
    "bake with {his} dad",
    "collect pretty stones",
    "play with {his} toys",
    "watch the birds",
    "make up songs",
]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "so happy", "very happy", "full of joy"]
FEELINGS_BAD = ["sad", "upset", "worried", "very sad", "so sad", "a little scared"]
TIMES = [
    "One day",
    "One sunny day",
    "One morning",
    "One afternoon",
    "One bright morning",
    "One warm day",
    "One cold morning",
    "One windy day",
    "Later that day",
    "The next day",
    "One evening",
]
ADULTS = [("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he")]


@dataclass
class Place:
    name: str  # "the park"
    things: list[str]  # what one sees there
    spots: list[str]  # where a thing can hide
    at: str = ""  # "in the park"; "at " + name if left out
    outside: bool = True


PLACES = [
    Place(
        "the park",
        ["the swings", "the slide", "a big tree", "the sandbox", "a long bench", "the duck pond"],
        ["under the slide", "behind a big tree", "near the bench", "in the sandbox", "by the swings"],
    ),
    Place(
        "the garden",
        ["the flowers", "a little pond", "the vegetable patch", "a big rose bush", "the fence"],
        [
            "under a big leaf",
            "behind the rose bush",
            "in the tall grass",
            "next to the watering can",
            "under the fence",
        ],
    ),
    Place(
        "the forest",
        ["tall trees", "a little stream", "soft green moss", "a hollow log", "a path of stones"],
        ["inside a hollow log", "under a pile of leaves", "behind a mossy rock", "near the stream", "under a bush"],
    ),
    Place(
        "the beach",
        ["the sand", "the waves", "pretty shells", "big rocks", "a red boat"],
        ["under the sand", "behind a big rock", "near the water", "in a sand hole", "under a towel"],
    ),
    Place(
        "the farm",
        ["the big barn", "the cows", "a stack of hay", "the chickens", "a muddy pond"],
        ["in the hay", "behind the barn", "near the chicken coop", "under the cart", "by the gate"],
    ),
    Place(
        "the backyard",
        ["the grass", "a little shed", "the clothesline", "a tall tree", "a bird bath"],
        ["behind the shed", "under the steps", "in a flower pot", "under the tree", "near the bird bath"],
    ),
    Place(
        "the meadow",
        ["tall grass", "wild flowers", "buzzing bees", "a big rock", "a little hill"],
        ["in the tall grass", "behind the big rock", "among the flowers", "at the bottom of the hill", "under a bush"],
    ),
    Place(
        "the playground",
        ["the slide", "the monkey bars", "the seesaw", "the sandbox", "a round swing"],
        ["under the seesaw", "in the sandbox", "behind the slide", "near the monkey bars", "by the gate"],
    ),
    Place(
        "the living room",
        ["the kitchen", "a soft sofa", "the big window", "the stairs", "a cozy rug"],
        ["under the bed", "behind the sofa", "in the toy box", "under a pillow", "in the closet"],
        outside=False,
    ),
    Place(
        "the school",
        ["the classroom", "the big desk", "colorful books", "the art table", "the yard"],
        ["under a desk", "in the coat room", "behind the bookshelf", "in the art box", "near the door"],
        outside=False,
    ),
    Place(
        "the hill",
        ["soft grass", "a lonely tree", "the whole town below", "big white clouds"],
        ["behind the lonely tree", "in the soft grass", "under a flat stone", "near the top"],
    ),
    Place(
        "the river",
        ["the water", "smooth stones", "a little bridge", "green reeds", "jumping fish"],
        ["under the bridge", "among the reeds", "behind a stone", "on the bank"],
    ),
]


for _place in PLACES:
    _place.at = _place.at or {
        "the park": "in the park",
        "the garden": "in the garden",
        "the forest": "in the forest",
        "the farm": "on the farm",
        "the backyard": "in the backyard",
        "the meadow": "in the meadow",
        "the living room": "in the living room",
        "the hill": "on the hill",
        "the river": "by the river",
    }.get(_place.name, "at " + _place.name)


def art(word: str) -> str:
    """'a' or 'an' before a word."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def the(phrase: str) -> str:
    """'a tall giraffe' -> 'the tall giraffe'; 'funny monkeys' -> 'the funny monkeys'."""
    for a in ("a ", "an "):
        if phrase.startswith(a):
            return "the " + phrase[len(a) :]
    return "the " + phrase


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class Character:
    name: str
    kind: str  # "girl", "boy", or an animal
    female: bool
    trait: str

    @property
    def he(self) -> str:
        return "she" if self.female else "he"

    @property
    def him(self) -> str:
        return "her" if self.female else "him"

    @property
    def his(self) -> str:
        return "her" if self.female else "his"

    @property
    def called(self) -> str:
        """'Tom', or 'Spot the dog' for an animal."""
        return self.name if self.human else f"{self.name} the {self.kind}"

    @property
    def human(self) -> bool:
        return self.kind in ("girl", "boy")


class Story:
    """One story being written: its random stream, cast, setting, and the sentences so far."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used_names: set[str] = set()
        self.paragraphs: list[list[str]] = [[]]
        self.place = rng.choice(PLACES)

    # ---- choices ----
    def c(self, *options):
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def character(self, human: bool | None = None) -> Character:
        rng = self.rng
        if human is None:
            human = rng.random() < 0.6
        female = rng.random() < 0.5
        if human:
            kind, pool = ("girl", GIRLS) if female else ("boy", BOYS)
        else:
            kind, pool = rng.choice(ANIMALS), PET_NAMES
        name = rng.choice([n for n in pool if n not in self.used_names])
        self.used_names.add(name)
        return Character(name, kind, female, rng.choice(TRAITS))

    def thing(self) -> str:
        toy = self.rng.choice(TOYS)
        return f"{self.rng.choice(COLORS)} {toy}" if self.chance(0.7) else toy

    def adult(self, ch: Character) -> tuple[str, str]:
        who, pron = self.rng.choice(ADULTS)
        return f"{ch.his} {who}", pron

    # ---- writing ----
    def add(self, *sentences: str) -> None:
        for s in sentences:
            self.paragraphs[-1].append(cap(s))

    def para(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def say(self, who: Character | str, text: str, verb: str | None = None, pron: bool = False) -> None:
        """A line of dialogue, with the tag before or after the quote and a verb that fits its punctuation."""
        name = who if isinstance(who, str) else (who.he if pron else who.name)
        end = text[-1]
        if verb is None:
            if end == "?":
                verb = "asked"
            elif end == "!":
                verb = self.c("said", "shouted", "cried", "said", "yelled")
            else:
                verb = self.c("said", "said", "said", "said", "whispered", "replied" if pron else "said")
        form = self.rng.random()
        if form < 0.5:
            quote = text[:-1] + "," if end == "." else text
            self.add(f'"{quote}" {name} {verb}.' if pron or form < 0.35 else f'"{quote}" {verb} {name}.')
        else:
            self.add(f'{name} {verb}, "{text}"')

    def text(self) -> str:
        return "\n\n".join(" ".join(p) for p in self.paragraphs if p)


# ---------------------------------------------------------------- openings and endings


def opening(s: Story, hero: Character) -> None:
    size = s.c(*SIZES)
    kind = hero.kind
    where = s.c(
        "a small town",
        "a little village",
        "a big city",
        "a house by the sea",
        "a cozy house",
        "a green valley",
        "a quiet street",
        "a house near the forest",
        "a farm",
    )
    a_hero = art(f"{hero.trait} {size} {kind}") if s.chance(0.5) else art(f"{size} {kind}")
    form = s.rng.random()
    if form < 0.35:
        s.add(f"Once upon a time, there was {a_hero} named {hero.name}.")
    elif form < 0.5:
        s.add(f"Once upon a time, in {where}, there lived {a_hero} named {hero.name}.")
    elif form < 0.6:
        s.add(f"Once upon a time, {art(size + ' ' + kind)} named {hero.name} lived in {where}.")
    elif form < 0.7:
        s.add(f"There was once {a_hero} called {hero.name}.")
    elif form < 0.8:
        s.add(f"{hero.name} was {a_hero}.")
    elif form < 0.9:
        s.add(f"Once there was {a_hero}. {cap(hero.his)} name was {hero.name}.")
    else:
        s.add(f"Long ago, in {where}, there was {a_hero} named {hero.name}.")
    if s.chance(0.75):
        act = s.c(*ACTIVITIES).format(his=hero.his)
        s.add(
            s.c(
                f"{hero.he} loved to {act}.",
                f"{hero.he} liked to {act} every day.",
                f"Every day, {hero.he} liked to {act}.",
                f"More than anything, {hero.he} loved to {act}.",
                f"{hero.he} was very {hero.trait} and loved to {act}.",
            )
        )


def when(s: Story) -> str:
    return s.c(*TIMES)


def ending(s: Story, hero: Character, friend: Character | None = None, moral: str | None = None) -> None:
    s.para()
    options = [
        f"{hero.name} smiled. It was the best day ever.",
        f"That night, {hero.name} went to bed with a big smile.",
        f"{hero.name} was {s.c(*FEELINGS_GOOD)}, and {hero.he} never forgot that day.",
    ]
    if friend is not None:
        options += [
            f"From that day on, {hero.name} and {friend.name} were best friends.",
            f"{hero.name} and {friend.name} played together until the sun went down.",
            f"After that, {hero.name} and {friend.name} played together every day.",
        ]
    if moral is not None and s.chance(0.6):
        s.add(
            s.c(
                f"{hero.name} learned that {moral}.",
                f"That day, {hero.name} learned that {moral}.",
                f"{hero.name} knew now that {moral}.",
            )
        )
    s.add(s.c(*options))
    if s.chance(0.08):
        s.add(s.c("And they all lived happily ever after.", "The end."))


# ---------------------------------------------------------------- plots


def plot_lost_thing(s: Story, hero: Character) -> None:
    thing = s.thing()
    spot = s.c(*s.place.spots)
    s.add(
        s.c(
            f"{hero.he} had {art(thing)} that {hero.he} loved very much.",
            f"{hero.name} had a favorite toy. It was {art(thing)}.",
            f"{hero.his} best toy was {art(thing)}.",
        )
    )
    s.para()
    s.add(f"{when(s)}, {hero.name} took the {thing} to {s.place.name}.")
    s.add(
        s.c(
            f"{hero.he} played with it near {s.c(*s.place.things)}.",
            f"{hero.he} played and played.",
            f"{hero.he} showed it to everyone {hero.he} met.",
        )
    )
    s.add(
        s.c(
            f"But when it was time to go home, the {thing} was gone!",
            f"Then {hero.he} looked down. The {thing} was not there!",
            f"After a while, {hero.he} could not find the {thing}.",
        )
    )
    s.add(f"{hero.name} felt {s.c(*FEELINGS_BAD)}.")
    s.say(hero, s.c(f"Where is my {thing}?", "Oh no! I lost it!", f"Has anyone seen my {thing}?"))
    friend = None
    s.para()
    if s.chance(0.6):
        friend = s.character()
        s.add(
            s.c(
                f"Just then, {art(friend.kind)} named {friend.name} came by.",
                f"{hero.his} friend {friend.called} saw {hero.him} and came over.",
                f"A {friend.trait} {friend.kind} called {friend.name} heard {hero.him}.",
            )
        )
        s.say(
            friend,
            s.c("Do not worry. I will help you look.", "Don't be sad. We can find it together.", "I will help you!"),
        )
        s.add(
            s.c(
                f"They looked {s.c(*s.place.spots)}. It was not there.",
                "They looked high and low.",
                "They searched everywhere.",
            )
        )
        finder = s.c(hero, friend)
        s.add(f"Then {finder.name} looked {spot}.")
    else:
        s.add(s.c(f"{hero.he} looked {s.c(*s.place.spots)}, but it was not there.", f"{hero.he} looked everywhere."))
        s.add(f"At last, {hero.he} looked {spot}.")
        finder = hero
    s.say(finder, s.c("There it is!", "I found it!", f"Look, the {thing}!"), pron=finder is hero)
    s.add(s.c(f"{hero.name} hugged the {thing} tight.", f"{hero.name} was so happy to have {hero.his} {thing} back."))
    if friend is not None:
        s.say(hero, s.c("Thank you for helping me!", "Thank you, you are a good friend.", "Thank you so much!"))
        s.say(friend, s.c("You are welcome.", "That is what friends are for.", "I am glad we found it."), verb="said")
    ending(
        s,
        hero,
        friend,
        s.c("it is good to take care of your things", "friends help each other", "you should never give up"),
    )


def plot_new_friend(s: Story, hero: Character) -> None:
    other = s.character()
    s.para()
    s.add(f"{when(s)}, {hero.name} went to {s.place.name}.")
    s.add(
        s.c(
            f"{hero.he} saw {art(other.kind)} sitting alone near {s.c(*s.place.things)}.",
            f"There {hero.he} saw {art(other.trait + ' ' + other.kind)} all by {other.him}self.",
            f"Near {s.c(*s.place.things)}, there was {art(other.kind)} who looked {s.c(*FEELINGS_BAD)}.",
        )
    )
    s.add(
        s.c(
            f"The {other.kind} looked lonely.",
            f"The {other.kind} had no one to play with.",
            f"{hero.name} wanted to say hello, but {hero.he} felt a little shy.",
        )
    )
    s.para()
    s.add(s.c(f"{hero.name} walked over and smiled.", f"{hero.name} took a deep breath and walked over."))
    s.say(
        hero,
        s.c(
            "Hello! My name is " + hero.name + ". What is your name?",
            "Hi! Do you want to play with me?",
            "Hello! Why are you sitting all alone?",
        ),
    )
    s.say(
        other,
        s.c(
            f"My name is {other.name}. I am new here.",
            f"I am {other.name}. I have no friends here.",
            f"I am {other.name}. Nobody wants to play with me.",
        ),
        verb="said",
    )
    game = s.c("tag", "hide and seek", "catch", "a game of pretend", "a jumping game", "a guessing game")
    s.say(
        hero,
        s.c(
            f"You can play with me! Let's play {game}.",
            f"I will be your friend. Do you like {game}?",
            f"Come with me. We can play {game} together.",
        ),
    )
    s.add(f"{other.name} smiled a big smile.")
    s.para()
    s.add(
        s.c(
            f"They played {game} all afternoon.",
            f"They played {game} and laughed and laughed.",
            f"They ran and played {game} until they were tired.",
        )
    )
    if s.chance(0.5):
        food = s.c(*FOODS)
        s.add(
            f"Then they sat down and shared some {food}."
            if not food.startswith("a ")
            else f"Then they sat down and shared {food}."
        )
    ending(
        s,
        hero,
        other,
        s.c("it is nice to be kind to someone new", "a smile can make a new friend", "everyone needs a friend"),
    )


def plot_sharing(s: Story, hero: Character) -> None:
    friend = s.character()
    thing = s.thing()
    s.para()
    s.add(f"{when(s)}, {hero.name} and {hero.his} friend {friend.name} were playing {s.place.at}.")
    s.add(s.c(f"{hero.name} had {art(thing)}.", f"They found {art(thing)} near {s.c(*s.place.things)}."))
    s.add(s.c(f"Both of them wanted to play with the {thing}.", f"{friend.name} wanted the {thing} too."))
    s.say(hero, s.c("It is mine!", f"I want the {thing}!", "Give it to me!"))
    s.say(friend, s.c("No, I want it!", "But I want to play with it too!", "It is my turn!"))
    s.add(
        s.c(
            "They pulled and pulled.",
            f"They both held on to the {thing} and would not let go.",
            "They began to shout at each other.",
        )
    )
    if s.chance(0.4):
        s.add(
            s.c(
                f"Then the {thing} fell on the ground.",
                f"Then the {thing} got a little tear.",
                "Then they both fell down.",
            )
        )
        s.add(f"Both of them felt {s.c(*FEELINGS_BAD)}.")
    s.para()
    grown, pron = s.adult(hero)
    s.add(s.c(f"{cap(grown)} saw them and came over.", f"{cap(grown)} heard the noise."))
    s.say(
        grown,
        s.c("Why don't you take turns?", "If you share, you can both have fun.", "Fighting is no fun. Can you share?"),
    )
    s.add(s.c(f"{hero.name} and {friend.name} looked at each other.", f"{hero.name} thought about it."))
    s.say(hero, s.c(f"You can go first, {friend.name}.", "Let's share it.", "Okay. We can take turns."))
    s.say(friend, s.c("Thank you! Then it is your turn.", "Sharing is fun!", "I am sorry I shouted."), verb="said")
    s.add(
        s.c(
            f"They took turns with the {thing}, and they had lots of fun.",
            f"They played with the {thing} together, and it was more fun than playing alone.",
        )
    )
    ending(s, hero, friend, s.c("sharing is caring", "it is more fun to share", "friends should take turns"))


def plot_afraid(s: Story, hero: Character) -> None:
    fear, brave_act = s.c(
        ("the dark", "sleep with the light off"),
        ("thunder", "listen to the storm"),
        ("the big slide", "go down the big slide"),
        ("the water", "swim in the lake"),
        ("the big dog next door", "say hello to the big dog"),
        ("the tall ladder", "climb the tall ladder"),
        ("the deep snow", "jump in the snow"),
        ("the loud waves", "play near the waves"),
    )
    s.add(
        s.c(
            f"But {hero.name} was afraid of {fear}.",
            f"There was one thing {hero.name} did not like: {fear}.",
            f"{hero.name} had a secret. {cap(hero.he)} was scared of {fear}.",
        )
    )
    s.para()
    grown, pron = s.adult(hero)
    s.add(f"{when(s)}, {hero.name} had to {brave_act}.")
    s.add(
        s.c(
            f"{hero.his} legs felt wobbly.",
            f"{hero.his} heart went thump, thump, thump.",
            f"{hero.he} wanted to run and hide.",
        )
    )
    s.say(hero, s.c("I am scared!", "I can't do it!", "What if something bad happens?"))
    s.say(
        grown,
        s.c(
            "It is okay to be scared. I am right here with you.",
            "Being brave means doing it even when you are scared.",
            "Hold my hand. We can do it together.",
        ),
        verb="said",
    )
    s.para()
    s.add(
        s.c(f"{hero.name} took a deep breath.", f"{hero.name} held {grown}'s hand.", f"{hero.name} counted to three.")
    )
    s.add(
        s.c(
            f"Then {hero.he} did it! {cap(hero.he)} was able to {brave_act}.",
            f"Slowly, {hero.he} was able to {brave_act}.",
            f"It was not so bad after all. {cap(hero.he)} was able to {brave_act}.",
        )
    )
    s.say(hero, s.c("I did it!", "That was not scary at all!", "I am brave!"), pron=True)
    s.add(f"{cap(grown)} gave {hero.him} a big hug.")
    ending(
        s,
        hero,
        None,
        s.c(
            "being brave is not the same as never being scared",
            "things are not so scary when you try",
            "you can do hard things",
        ),
    )


def plot_help_animal(s: Story, hero: Character) -> None:
    animal = s.c("bird", "kitten", "puppy", "duck", "bunny", "squirrel", "baby owl", "little frog")
    trouble, fix = s.c(
        ("stuck high up in a tree", f"{hero.name} climbed up carefully and helped it down"),
        ("with a hurt wing", f"{hero.name} wrapped it in a soft cloth and gave it some water"),
        ("caught in a net", f"{hero.name} pulled the net open, very gently"),
        ("lost and crying for its mother", f"{hero.name} helped it look until they found its mother"),
        ("cold and wet from the rain", f"{hero.name} took it home and dried it with a warm towel"),
        ("stuck in a hole", f"{hero.name} reached down and lifted it out"),
    )
    s.para()
    s.add(f"{when(s)}, {hero.name} was walking {s.place.at}.")
    s.add(
        s.c(
            f"{cap(hero.he)} heard a tiny sound.",
            f"Suddenly, {hero.he} heard someone crying.",
            f"{cap(hero.he)} saw something move near {s.c(*s.place.things)}.",
        )
    )
    s.add(f"It was {art('little ' + animal)} {trouble}.")
    s.say(hero, s.c("Oh no! Poor little thing.", "Don't worry. I will help you.", "Are you okay?"))
    s.para()
    s.add(f"{fix}.")
    s.add(s.c(f"The {animal} looked up at {hero.name}.", f"Soon the {animal} felt much better."))
    if s.chance(0.5):
        s.add(
            s.c(
                "It made a happy little sound, as if to say thank you.",
                f"It licked {hero.his} hand.",
                "It flapped and hopped around happily.",
            )
        )
    if s.chance(0.5):
        grown, _ = s.adult(hero)
        s.add(f"When {hero.name} told {grown}, {grown} was very proud.")
        s.say(grown, s.c("You have a kind heart.", "You did a good thing today.", "I am so proud of you."), verb="said")
    ending(
        s,
        hero,
        None,
        s.c(
            "it is good to help those who need it",
            "even small helpers can do big things",
            "kindness makes everyone happy",
        ),
    )


def plot_make_something(s: Story, hero: Character) -> None:
    grown, pron = s.adult(hero)
    what, steps, oops, fix = s.c(
        (
            "a cake",
            "They mixed flour, eggs and sugar in a big bowl",
            "the bowl fell and the flour went everywhere",
            "They laughed, cleaned up and started again",
        ),
        (
            "a sandcastle",
            "They made tall towers and a wall around it",
            "a big wave came and washed it away",
            "They built it again, a little farther from the water",
        ),
        (
            "a birdhouse",
            "They cut the wood and painted it blue",
            "the roof fell off",
            "They used more glue and held it until it was strong",
        ),
        (
            "a tower of blocks",
            "They put one block on top of another",
            "the tower fell down with a crash",
            "They built it again, slowly and carefully",
        ),
        (
            "a big picture",
            "They used every color in the box",
            "the paint spilled on the paper",
            "They turned the spill into a big yellow sun",
        ),
        (
            "a snowman",
            "They rolled three big balls of snow",
            "the head rolled off",
            "They patted more snow on it to make it stick",
        ),
        (
            "cookies",
            "They cut the dough into stars and hearts",
            "some of the cookies got burnt",
            "They made a new batch and watched the oven closely",
        ),
    )
    s.para()
    s.add(f"{when(s)}, {hero.name} and {grown} decided to make {what}.")
    s.say(hero, s.c("Can I help?", "This will be so much fun!", f"I want to make the best {what.split()[-1]} ever!"))
    s.add(f"{steps}.")
    s.add(s.c(f"But then {oops}.", f"Oh no! Suddenly {oops}.", f"Everything was going well, but then {oops}."))
    s.add(s.c(f"{hero.name} wanted to cry.", f"{hero.name} felt {s.c(*FEELINGS_BAD)}."))
    s.say(
        grown, s.c("It's okay. We can fix it.", "Don't worry. Mistakes help us learn.", "Let's try again."), verb="said"
    )
    s.para()
    s.add(f"{fix}.")
    s.add(
        s.c(
            f"At last, {what} was ready.",
            f"In the end, {what} was even better than before.",
            f"When they finished, {hero.name} looked at {what} and smiled.",
        )
    )
    s.say(hero, s.c("We did it!", "It is beautiful!", "Can we make another one tomorrow?"))
    ending(
        s,
        hero,
        None,
        s.c("mistakes are okay if you try again", "working together makes things better", "you should never give up"),
    )


def plot_learn_skill(s: Story, hero: Character) -> None:
    skill, fall = s.c(
        ("ride a bike", "the bike wobbled and fell over"),
        ("swim", "water went up {his} nose"),
        ("fly a kite", "the kite crashed into the grass"),
        ("skip with a rope", "the rope hit {his} feet"),
        ("climb the big tree", "{he} slipped and landed on the soft grass"),
        ("whistle", "only air came out"),
        ("read a whole book", "the words were too hard"),
        ("catch a ball", "the ball bounced off {his} nose"),
        ("tie {his} shoes", "the laces got all tangled"),
    )
    skill, fall = skill.format(his=hero.his), fall.format(his=hero.his, he=hero.he)
    helper = s.character() if s.chance(0.5) else None
    teacher = helper.name if helper else s.adult(hero)[0]
    s.para()
    s.add(s.c(f"{hero.name} wanted to learn to {skill}.", f"{when(s)}, {hero.name} decided to learn to {skill}."))
    s.add(s.c(f"{cap(teacher)} said {pron_for(teacher, helper)} would help.", f"{cap(teacher)} came to help."))
    s.add(f"{hero.name} tried, but {fall}.")
    s.say(hero, s.c("This is too hard!", "I will never learn!", "Why can't I do it?"))
    s.say(
        teacher,
        s.c(
            "Everybody falls at first. Try again!",
            "Keep trying. You are getting better!",
            "Go slow, and don't give up.",
        ),
        verb="said",
    )
    s.para()
    s.add(
        s.c(
            f"So {hero.name} tried again. And again.",
            f"{hero.name} tried again and again.",
            f"{hero.name} practiced every day.",
        )
    )
    s.add(
        s.c(
            f"Then, one day, {hero.he} could {skill}!",
            f"At last, {hero.he} was able to {skill}!",
            f"Finally, {hero.he} did it. {cap(hero.he)} could {skill}!",
        )
    )
    s.say(hero, s.c("Look at me!", "I did it!", "I can do it now!"))
    s.add(f"{cap(teacher)} clapped and cheered.")
    ending(
        s,
        hero,
        helper,
        s.c("practice makes things easier", "you should never give up", "it is okay to fall if you get up again"),
    )


def pron_for(name: str, helper: Character | None) -> str:
    if helper is not None:
        return helper.he
    return "she" if name.split()[-1] in ("mom", "grandma") else "he"


def plot_rainy_day(s: Story, hero: Character) -> None:
    plan = s.c("have a picnic", "go to the park", "play ball outside", "go to the beach", "fly a kite")
    grown, _ = s.adult(hero)
    s.para()
    s.add(f"{when(s)}, {hero.name} wanted to {plan}.")
    s.add(
        s.c(
            "But when {he} looked out the window, it was raining.",
            "But then dark clouds came, and it began to rain.",
            "But it rained and rained.",
        ).format(he=hero.he)
    )
    s.say(hero, s.c("Now we can't go outside!", "I don't like the rain!", "What can we do now?"))
    s.add(f"{hero.name} felt {s.c(*FEELINGS_BAD)}.")
    s.para()
    indoor = s.c(
        "build a fort with blankets and pillows",
        "bake some cookies",
        "play a board game",
        "read a story about a dragon",
        "paint pictures of the rain",
        "have a picnic on the living room floor",
    )
    s.say(grown, s.c(f"We can {indoor}!", f"Why don't we {indoor}?", f"Let's {indoor} instead."), verb="said")
    s.add(
        s.c(
            "So they did, and it was a lot of fun.",
            f"{hero.name} liked that idea.",
            f"They had so much fun that {hero.name} forgot about the rain.",
        )
    )
    if s.chance(0.6):
        s.add(s.c("Later, the rain stopped and the sun came out.", "After a while, the rain stopped."))
        s.add(
            s.c(
                "There was a big rainbow in the sky!",
                f"{hero.name} ran outside to jump in the puddles.",
                "Everything looked fresh and shiny.",
            )
        )
        s.say(hero, s.c("Look, a rainbow!", "The sun is back!", "Rainy days can be fun too!"))
    ending(
        s,
        hero,
        None,
        s.c(
            "a rainy day can be a happy day",
            "there is always something fun to do",
            "plans can change and still be good",
        ),
    )


def plot_birthday(s: Story, hero: Character) -> None:
    friend = s.character()
    gift = s.thing()
    s.para()
    s.add(
        s.c(
            f"Today was {hero.name}'s birthday.",
            f"It was {hero.name}'s birthday.",
            f"Soon it would be {hero.name}'s birthday.",
        )
    )
    s.add(s.c(f"{hero.he} was very excited.", f"{hero.he} could not wait."))
    s.add(
        s.c(f"But {hero.he} thought that everyone had forgotten.", f"{hero.he} wanted {art(gift)} more than anything.")
    )
    s.para()
    s.add(
        s.c(f"In the afternoon, {friend.name} knocked on the door.", f"Then {hero.his} friend {friend.name} came over.")
    )
    s.say(friend, s.c("Happy birthday!", "Surprise!", "I have something for you!"))
    s.add(
        s.c(f"{friend.name} gave {hero.him} a box with a bow on top.", f"{friend.name} had a present for {hero.him}.")
    )
    s.add(s.c(f"Inside the box, there was {art(gift)}!", f"{hero.name} opened it. It was {art(gift)}!"))
    s.say(hero, s.c("Thank you! I love it!", "Wow! It is just what I wanted!", "This is the best present ever!"))
    if s.chance(0.6):
        s.add(
            s.c(
                "Then they ate cake and played games.",
                "They ate a big cake with candles on top.",
                "Everyone sang a birthday song.",
            )
        )
    ending(
        s,
        hero,
        friend,
        s.c("friends make every day special", "the best gifts come from friends", "it feels good to be remembered"),
    )


def plot_dont_listen(s: Story, hero: Character) -> None:
    grown, pron = s.adult(hero)
    rule, trouble, lesson = s.c(
        ("Don't go near the pond", f"{hero.he} slipped and fell into the muddy water", "listen to grown-ups"),
        ("Don't eat the cookies before dinner", f"{hero.his} tummy began to hurt", "it is good to wait"),
        ("Don't climb on the table", "a cup fell and broke", "rules keep us safe"),
        ("Don't play with the ball inside", "the ball hit a vase and it broke", "rules keep us safe"),
        ("Don't go too far", f"{hero.he} could not find the way back", "it is important to listen"),
        ("Don't touch the paint", f"{hero.his} hands and {hero.his} shirt got all green", "it is important to listen"),
    )
    s.para()
    s.add(f'{when(s)}, {grown} said, "{rule}, {hero.name}."')
    s.add(
        s.c(
            f"But {hero.name} did not listen.",
            f"{hero.name} nodded, but {hero.he} did not really listen.",
            f"But {hero.name} was very curious.",
        )
    )
    s.add(s.c(f"When nobody was looking, {hero.he} did it anyway.", f"Soon {hero.he} forgot what {pron} said."))
    s.add(f"Then {trouble}.")
    s.say(hero, s.c("Oh no!", "Help!", "What have I done?"))
    s.para()
    s.add(f"{cap(grown)} came quickly.")
    s.say(hero, s.c("I am sorry. I should have listened.", "I'm sorry! I did not listen.", "I am sorry."), verb="said")
    s.say(
        grown,
        s.c(
            "It's okay. I am glad you are safe.",
            "Thank you for saying sorry. Let's fix it together.",
            "Now you know why we have rules.",
        ),
        verb="said",
    )
    s.add(s.c(f"They cleaned up together, and {grown} gave {hero.him} a hug.", f"{grown} gave {hero.him} a big hug."))
    ending(s, hero, None, lesson)


def plot_trip(s: Story, hero: Character) -> None:
    grown, _ = s.adult(hero)
    place, sights = s.c(
        ("the zoo", ["a tall giraffe", "a big gray elephant", "funny monkeys", "a sleepy lion", "colorful birds"]),
        ("the beach", ["big waves", "little crabs", "white birds", "pretty shells", "a long boat"]),
        ("the farm", ["brown cows", "noisy chickens", "a pink pig", "soft sheep", "a big red tractor"]),
        ("the big city", ["tall buildings", "busy cars", "a huge fountain", "a red bus", "a shop full of toys"]),
        ("the lake", ["ducks", "little fish", "a wooden boat", "tall reeds", "a green frog"]),
        ("the museum", ["old bones", "shiny rocks", "big paintings", "a dinosaur", "a model rocket"]),
    )
    a, b, c = s.rng.sample(sights, 3)
    s.para()
    s.add(
        s.c(f"{when(s)}, {hero.name} went to {place} with {grown}.", f"{when(s)}, {grown} took {hero.name} to {place}.")
    )
    s.say(hero, s.c("I can't wait!", "What will we see?", "Are we there yet?"))
    s.add(s.c(f"At {place}, they saw {a}, {b} and {c}.", f"First they saw {a}. Then they saw {b} and {c}."))
    s.add(s.c(f"{hero.name} liked {the(s.c(a, b, c))} best.", f"{hero.name}'s favorite was {the(a)}."))
    if s.chance(0.5):
        s.say(hero, s.c(f"Look at {a}!", "Wow! Look at that!", "Can we stay here forever?"))
    s.para()
    s.add(
        s.c(f"They ate {s.c(*FOODS)} for lunch.", "Then they had a picnic under a tree.", "Then they bought ice cream.")
    )
    s.add(s.c(f"When the day was over, {hero.name} was very tired.", f"On the way home, {hero.name} fell asleep."))
    ending(s, hero, None, None)


def plot_seed(s: Story, hero: Character) -> None:
    plant = s.c("sunflower", "tomato", "pumpkin", "rose", "apple tree", "bean plant", "daisy")
    s.para()
    s.add(
        s.c(
            f"{when(s)}, {hero.name} found a tiny seed.",
            f"{when(s)}, {hero.his} grandpa gave {hero.him} a little seed.",
        )
    )
    s.add(s.c(f"{hero.he} planted it {s.place.at}.", f"{hero.he} put it in the ground and covered it with soil."))
    s.add(s.c(f"Every day, {hero.he} gave it water.", f"Every morning, {hero.he} watered it and waited."))
    s.add(s.c("But nothing happened.", "For many days, nothing grew."))
    s.say(hero, s.c("Why is it not growing?", "Will it ever grow?"))
    s.para()
    s.add(s.c(f"{hero.name} did not give up.", f"{hero.name} was patient."))
    s.add(s.c("Then one morning, there was a little green shoot!", "Then one day, a small green leaf came up!"))
    s.add(f"It grew and grew, and soon it was a big {plant}.")
    s.say(hero, s.c("It grew!", f"My {plant} is so big!", "Look what my little seed did!"))
    ending(s, hero, None, s.c("good things take time", "being patient is worth it", "little things can grow big"))


def plot_race(s: Story, hero: Character) -> None:
    friend = s.character()
    finish = s.c("the big tree", "the end of the field", "the top of the hill", "the gate", "the old bench")
    s.para()
    s.add(
        s.c(
            f"{when(s)}, {hero.name} and {friend.name} had a race to {finish}.",
            f"{when(s)}, {hero.name} and {hero.his} friend {friend.called} had a race to {finish}.",
        )
    )
    s.say(friend, s.c("Ready, set, go!", "I will win!", "Let's see who is faster!"))
    s.add(s.c("They ran as fast as they could.", "They ran and ran."))
    s.add(
        s.c(
            f"But then {friend.name} tripped and fell.",
            f"Halfway there, {friend.name} fell down and hurt {friend.his} knee.",
        )
    )
    s.para()
    s.add(s.c(f"{hero.name} could win the race now.", f"{hero.name} was ahead."))
    s.add(s.c(f"But {hero.he} stopped and ran back.", f"But {hero.he} did not want to leave {hero.his} friend."))
    s.say(hero, s.c("Are you okay?", "Let me help you up.", "Take my hand."))
    s.add(f"{hero.name} helped {friend.name} up, and they walked to {finish} together.")
    s.say(friend, s.c("Thank you. You are a true friend.", "We both won!", "Thank you for coming back."), verb="said")
    ending(s, hero, friend, s.c("helping a friend is better than winning", "friends come first"))


def plot_treasure(s: Story, hero: Character) -> None:
    friend = s.character() if s.chance(0.6) else None
    found = s.c(
        "a box of shiny buttons",
        "an old golden key",
        "a bag of marbles",
        "a little music box",
        "a letter from long ago",
        "a box of colorful stones",
    )
    s.para()
    s.add(s.c(f"{when(s)}, {hero.name} found an old map.", f"{when(s)}, {hero.name} found a map in a bottle."))
    s.add(s.c(f"The map showed a big X near {s.c(*s.place.things)}.", "There was a big red X on it."))
    if friend:
        s.add(f"{hero.he} showed it to {hero.his} friend {friend.name}.")
        s.say(friend, s.c("A treasure map! Let's find it!", "Maybe there is treasure!"))
    else:
        s.say(hero, s.c("A treasure map!", "I will find the treasure!"), pron=True)
    s.para()
    if friend:
        s.add(
            s.c(
                f"They followed the map to {s.place.name}.",
                f"They walked and walked until they came to {s.place.name}.",
            )
        )
        s.add(s.c(f"They dug {s.c(*s.place.spots)}.", "Dig, dig, dig!"))
    else:
        s.add(s.c(f"{hero.he} followed the map to {s.place.name}.", f"{hero.he} walked all the way to {s.place.name}."))
        s.add(s.c(f"{hero.he} dug {s.c(*s.place.spots)}.", "Dig, dig, dig!"))
    s.add(f"At last, they found {found}!" if friend else f"At last, {hero.he} found {found}!")
    s.say(hero, s.c("We found the treasure!" if friend else "I found the treasure!", "Wow!"))
    ending(
        s,
        hero,
        friend,
        s.c("the best treasure is a good friend" if friend else "adventures are fun", "it pays to keep looking"),
    )


def plot_tidy(s: Story, hero: Character) -> None:
    grown, pron = s.adult(hero)
    thing = s.thing()
    s.para()
    s.add(s.c(f"{hero.his} room was a big mess.", f"{when(s)}, {hero.name}'s toys were all over the floor."))
    s.say(grown, s.c(f"Please clean up your room, {hero.name}.", "It is time to tidy up."), verb="said")
    s.say(hero, s.c("But I want to play!", "Cleaning is boring!", "Do I have to?"), verb="said")
    s.say(grown, s.c("We can make it a game.", "Let's see how fast you can do it!"), verb="said")
    s.para()
    s.add(
        s.c(f"So {hero.name} put the toys in the box, one by one.", f"{hero.name} picked up the books and the blocks.")
    )
    s.add(
        s.c(
            f"Under the bed, {hero.he} found {hero.his} old {thing}!",
            f"Behind the toy box was {hero.his} lost {thing}!",
        )
    )
    s.say(hero, s.c(f"My {thing}! I thought it was gone!", "I found it!"), pron=True)
    s.add(s.c("Soon the room was clean and tidy.", "Before long, everything was in its place."))
    ending(s, hero, None, s.c("cleaning up can be fun", "it is good to keep things tidy"))


def plot_wish(s: Story, hero: Character) -> None:
    wish = s.c(
        "a friend to play with",
        "to fly like a bird",
        "to see the sea",
        "a puppy of {his} own",
        "to visit the moon",
        "a sunny day for the picnic",
    ).format(his=hero.his)
    s.para()
    s.add(s.c(f"One night, {hero.name} looked out of the window.", f"One night, {hero.name} could not sleep."))
    s.add(s.c("The sky was full of stars.", "The moon was big and round, and the stars were bright."))
    s.add(s.c("One star was brighter than all the rest.", "Then {he} saw a shooting star!").format(he=hero.he))
    s.say(hero, f"I wish for {wish}.", verb="whispered")
    s.add(s.c(f"Then {hero.he} closed {hero.his} eyes and fell asleep.", f"{hero.he} smiled and went back to bed."))
    s.para()
    if wish.startswith("a friend"):
        friend = s.character()
        s.add(f"The next day, a new {friend.kind} named {friend.name} moved in next door.")
        s.say(friend, "Do you want to play with me?")
        s.add(f"{hero.name} could not believe it. {cap(hero.his)} wish came true!")
        ending(s, hero, friend, "wishes can come true")
    else:
        s.add(
            s.c("In the morning, {his} wish had not come true.", "The next day, nothing was different.").format(
                his=hero.his
            )
        )
        s.add(
            s.c(
                f"But {hero.his} family had a surprise for {hero.him}.",
                f"But {hero.he} had a dream about it, and it was wonderful.",
            )
        )
        ending(s, hero, None, s.c("it is nice to wish and to dream", "some wishes come true in a different way"))


PLOTS = [
    plot_lost_thing,
    plot_new_friend,
    plot_sharing,
    plot_afraid,
    plot_help_animal,
    plot_make_something,
    plot_learn_skill,
    plot_rainy_day,
    plot_birthday,
    plot_dont_listen,
    plot_trip,
    plot_seed,
    plot_race,
    plot_treasure,
    plot_tidy,
    plot_wish,
]


def story(rng: random.Random) -> str:
    """One whole story from its random stream."""
    s = Story(rng)
    hero = s.character()
    opening(s, hero)
    rng.choice(PLOTS)(s, hero)
    return s.text()


def stories(n: int, seed: int = 0, start: int = 0) -> Iterator[str]:
    """Stories start .. start+n-1 of the stream `seed`; each has its own generator, seeded by (seed, index)."""
    for i in range(start, start + n):
        yield story(random.Random(f"storygen-{seed}-{i}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for text in stories(args.n, args.seed):
        print(text, end="\n\n---\n\n")


if __name__ == "__main__":
    main()
