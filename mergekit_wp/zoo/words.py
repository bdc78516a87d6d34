"""Word lists for the zoo's generated English-like prose (common English words, nothing copied)."""

from __future__ import annotations

NOUNS = (
    "fox", "river", "farmer", "garden", "bridge", "village", "teacher", "window", "market",
    "forest", "mountain", "child", "letter", "boat", "kitchen", "lamp", "road", "field",
    "horse", "bird", "stone", "tree", "house", "door", "friend", "baker", "song", "book",
    "table", "street", "harbor", "island", "valley", "storm", "cloud", "candle", "basket",
    "wagon", "painter", "sailor", "doctor", "student", "dog", "cat", "rabbit", "owl", "lake",
    "hill", "cottage", "library", "school", "train", "station", "garden wall", "orchard",
    "meadow", "tower", "castle", "clock", "bell", "coat", "hat", "map", "rope", "ladder",
    "wheel", "engine", "shop", "bakery", "farm", "barn", "pond", "path", "gate", "fence",
    "neighbor", "brother", "sister", "mother", "father", "king", "queen", "soldier", "poet",
    "singer", "dancer", "miller", "fisher", "hunter", "shepherd", "sheep", "goat", "cow",
)
ADJECTIVES = (
    "old", "young", "quiet", "bright", "small", "large", "warm", "cold", "gentle", "brave",
    "tired", "happy", "careful", "busy", "green", "red", "blue", "golden", "dark", "clever",
    "kind", "strong", "slow", "quick", "patient", "proud", "calm", "silent", "friendly",
    "simple", "tall", "narrow", "wide", "heavy", "light", "clean", "wet", "dry", "early",
    "late", "hungry", "curious", "gray", "white", "sunny", "windy", "lonely", "cheerful",
)
VERBS = (
    "walked", "looked", "waited", "worked", "listened", "rested", "smiled", "traveled",
    "played", "stayed", "returned", "wandered", "talked", "laughed", "called", "sang",
    "studied", "painted", "cooked", "cleaned", "climbed", "jumped", "moved", "turned",
    "watched", "searched", "slept", "read", "wrote", "danced", "waved", "whispered",
)
TRANSITIVE = (
    "found", "carried", "opened", "closed", "painted", "built", "fixed", "visited", "saw",
    "followed", "helped", "watched", "cleaned", "bought", "sold", "repaired", "noticed",
    "remembered", "touched", "crossed", "greeted", "passed", "reached", "left", "loved",
)
ADVERBS = (
    "slowly", "quickly", "quietly", "carefully", "happily", "softly", "gently", "often",
    "again", "together", "early", "later", "alone", "suddenly", "calmly", "proudly",
)
PREPOSITIONS = ("near", "behind", "beside", "under", "across", "along", "around", "toward", "past")
TIMES = (
    "morning", "evening", "afternoon", "night", "spring", "summer", "autumn", "winter",
    "early morning", "late evening",
)
NAMES = (
    "Anna", "Tom", "Mary", "John", "Lucy", "Peter", "Emma", "James", "Sarah", "David",
    "Grace", "Henry", "Alice", "Robert", "Clara", "Thomas", "Helen", "George", "Rose", "Paul",
)
CONNECTORS = ("and", "but", "so", "while", "because")
WEATHER = ("the sun was warm", "the wind was cold", "the rain was soft", "the sky was clear",
           "the air was still", "the night was dark", "the snow was deep", "the day was long")
ITEMS = (
    "apples", "books", "stones", "coins", "pencils", "cookies", "flowers", "shells", "cards",
    "eggs", "marbles", "stamps", "candles", "ribbons", "buttons", "oranges", "cups", "boxes",
)
# Syllables for invented entity names (knowledge facts); no real places or people.
SYLLABLES_A = ("bra", "ko", "vel", "mar", "zin", "tor", "lu", "fen", "dra", "qua", "sil", "mo")
SYLLABLES_B = ("lin", "vik", "dor", "ssa", "ran", "mel", "tos", "gar", "nix", "bel", "rum", "ta")
FACT_JOBS = ("baker", "sailor", "painter", "teacher", "farmer", "doctor", "poet", "miller")
FACT_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
FACT_ANIMALS = ("fox", "owl", "goat", "horse", "rabbit", "cat", "dog", "sheep")
