"""Chat prompts for self-distilling Medusa heads, written without any download: the requests an
assistant gets (explanations, how-to, code, lists, comparisons, rewriting, advice, writing, small
sums), built from templates and subjects. A prompt is held out when a hash of its subject says so,
so a held-out prompt's subject never appears in training.

    python -m training.chat_prompts            # counts, and a sample of each kind
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from training.corpus import held_out_by_hash

HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class ChatPrompt:
    kind: str
    subject: str  # what the split hashes: every prompt about one subject is on the same side
    text: str

    @property
    def held_out(self) -> bool:
        return held_out_by_hash(f"{self.kind}:{self.subject}", HELD_OUT_PERCENT)


CONCEPTS = """photosynthesis; gravity; inflation; the water cycle; machine learning; black holes; DNA; vaccines;
compound interest; the stock market; climate change; plate tectonics; electricity; magnetism; the immune system;
democracy; the French Revolution; the Roman Empire; the Industrial Revolution; the printing press; evolution;
natural selection; the Big Bang; quantum computing; blockchain; encryption; the internet; how search engines rank
pages; neural networks; recursion; object-oriented programming; databases; cloud computing; operating systems;
compilers; the greenhouse effect; renewable energy; nuclear fission; solar panels; batteries; supply and demand;
opportunity cost; the placebo effect; sleep; memory; meditation; nutrition; protein; vitamins; metabolism;
the heart; the brain; antibiotics; viruses; bacteria; the solar system; the moon's phases; tides; seasons; rainbows;
volcanoes; earthquakes; hurricanes; the ozone layer; photosynthesis in algae; coral reefs; rainforests; deserts;
bees and pollination; migration of birds; the food chain; ecosystems; recycling; composting; the scientific method;
statistics; probability; prime numbers; the Pythagorean theorem; calculus; algebra; fractions; percentages;
the speed of light; relativity; atoms; molecules; chemical reactions; acids and bases; the periodic table;
friction; sound waves; lenses; microscopes; telescopes; GPS; Wi-Fi; Bluetooth; 3D printing; robots; self-driving
cars; electric cars; airplanes and lift; rockets; the International Space Station; satellites; the Renaissance;
the Cold War; World War I; the Silk Road; ancient Egypt; the pyramids; the Great Wall of China; the Olympic Games;
jazz; classical music; impressionism; poetry; storytelling; the hero's journey; marketing; branding; budgeting;
taxes; credit scores; mortgages; insurance; startups; leadership; teamwork; negotiation; public speaking;
time management; procrastination; habits; motivation; stress; empathy; critical thinking; logical fallacies;
version control; unit testing; APIs; HTTP; JSON; regular expressions; sorting algorithms; binary search;
hash tables; linked lists; Big O notation; caching; multithreading; virtual memory; the CPU; RAM; GPUs;
open source software; Linux; the command line; spreadsheets; privacy online; phishing; passwords; two-factor
authentication; social media; journalism; copyright; the justice system; human rights; urbanization; coffee;
tea; bread baking; fermentation; chocolate; the history of pizza""".replace("\n", " ").split("; ")

TASKS = """learn a new language; start running; bake sourdough bread; save money each month; write a resume;
prepare for a job interview; fall asleep faster; study for an exam; start a vegetable garden; care for a houseplant;
make a cup of pour-over coffee; clean a laptop keyboard; change a flat tire; organize my closet; plan a road trip;
train a puppy; make new friends in a new city; stop procrastinating; give a good presentation; write a cover letter;
learn to play the guitar; improve my handwriting; make a budget; pack for a week-long trip; cook rice on the stove;
remove a coffee stain; start a podcast; build a birdhouse; meditate for the first time; read more books;
set up a home office; back up my computer; choose a laptop; learn to code; start a blog; reduce screen time;
make pancakes; keep a journal; learn to swim as an adult; negotiate a raise; write a thank-you note; host a
dinner party; paint a room; fix a leaky faucet; get better at chess; memorize a speech; run a team meeting;
prepare for a marathon; take better photos with my phone; learn to draw; make a smoothie; brew green tea;
install Python on Windows; speed up a slow computer; write a short story; improve my posture; drink more water;
stay focused while working from home; teach a child to ride a bike; plan a birthday party; write a haiku;
apologize to a friend; create a strong password; recycle electronics; start investing; learn touch typing""".replace(
    "\n", " ").split("; ")

CODE_TASKS = """reverses a string; checks whether a number is prime; returns the factorial of n; computes the nth
Fibonacci number; counts the vowels in a string; removes duplicates from a list; finds the largest number in a list;
sorts a list of dictionaries by a key; checks whether a word is a palindrome; merges two sorted lists; flattens a
nested list; counts word frequencies in a text; converts Celsius to Fahrenheit; reads a CSV file and prints each
row; validates an email address with a regular expression; returns the sum of the digits of a number; finds the
intersection of two lists; generates a random password; implements binary search; implements bubble sort;
transposes a matrix; checks whether two strings are anagrams; returns the n most common words in a file; converts
a decimal number to binary; computes the average of a list; finds the second largest number in a list; capitalizes
the first letter of every word; checks whether parentheses are balanced; computes the greatest common divisor;
rotates a list by k positions; splits a list into chunks of size n; parses a date string; downloads a web page;
reads a JSON file into a dictionary; writes a list of rows to a CSV file; counts lines in a text file; finds all
files with a given extension in a folder; implements a stack class; implements a queue with two stacks; computes
the Levenshtein distance between two strings; converts a Roman numeral to an integer; checks whether a year is a
leap year; returns the prime factors of a number; finds the longest word in a sentence; shuffles a list; groups
words by their first letter; retries a function call up to three times; measures how long a function takes;
caches the results of a function; returns the running total of a list; zips two lists into a dictionary""".replace(
    "\n", " ").split("; ")

LANGUAGES = ["Python", "JavaScript", "Java", "C", "Go", "Rust", "SQL", "Bash"]

THINGS = """healthy breakfast ideas; tips for better sleep; popular programming languages; ways to reduce stress;
famous scientists; planets in the solar system; benefits of exercise; ways to save energy at home; good habits for
students; classic novels; fun indoor activities for kids; easy dinner recipes; reasons to learn a second language;
common interview questions; ways to be more productive; tips for learning math; things to pack for a camping trip;
uses of artificial intelligence; ways to improve writing; popular tourist destinations in Europe; board games for
families; fruits high in vitamin C; ways to stay motivated; inventions that changed the world; tips for public
speaking; types of clouds; renewable energy sources; common logical fallacies; musical instruments; sports played
with a ball; ways to make friends; skills every programmer should have; ways to reduce plastic waste; kinds of
renewable materials; features of a good website; animals that live in the ocean; safety tips for hiking; things to
do on a rainy day; ways to learn faster; questions to ask on a first date; signs of dehydration; ideas for a
science fair project; ways to practice gratitude; simple exercises you can do at a desk; data structures; Python
libraries for data analysis; tips for writing clean code; ways to keep a conversation going""".replace(
    "\n", " ").split("; ")

PAIRS = """a virus and a bacterium; weather and climate; a list and a tuple in Python; RAM and storage; speed and
velocity; an atom and a molecule; a democracy and a republic; TCP and UDP; HTTP and HTTPS; a compiler and an
interpreter; stocks and bonds; a credit card and a debit card; baking soda and baking powder; a crocodile and an
alligator; empathy and sympathy; machine learning and deep learning; Java and JavaScript; a lake and a pond; a
hurricane and a tornado; mitosis and meiosis; an essay and a report; a goal and an objective; SQL and NoSQL
databases; a process and a thread; git merge and git rebase; weight and mass; a simile and a metaphor; affect and
effect; renting and buying a home; a cold and the flu; coffee and tea; cats and dogs as pets; reading and listening to
audiobooks; running and swimming for fitness; a laptop and a desktop; iOS and Android; email and instant messaging;
a rainforest and a desert; a star and a planet; fission and fusion""".replace("\n", " ").split("; ")

SENTENCES = """me and him goes to the store every days; the meeting have been moved to tomorrow because of the
weather; i think that the new policy are not fair for everyone; she dont like waking up early in the morning; the
results of the experiment was very surprising to the team; we was planning to visit our grandparents next weekend;
the book that I readed last week was really good; their going to announce the winner at noon; the company need to
hire more engineers this year; can you sent me the report before friday; the dog barked loud at the mailman;
everyone in the class have finished the test; he go to the gym three time a week; the cake was bake by my sister;
i has been working on this project since january; our team win the championship last season; the weather today is
more better than yesterday; she speak english and spanish very good; please let me known if you have any question;
the children was playing in the park all afternoon""".replace("\n", " ").split("; ")

PARAGRAPHS = [
    "The city council met on Tuesday to discuss a plan to build a new park near the river. Supporters say it will "
    "give families a place to relax, while critics worry about the cost and the loss of parking spaces.",
    "Regular exercise improves heart health, helps control weight, and can lift your mood. Experts suggest at "
    "least 150 minutes of moderate activity each week, such as brisk walking or cycling.",
    "The company released a new phone with a larger screen, a faster processor and a better camera. It costs more "
    "than last year's model, but reviewers say the battery life alone makes it worth the price.",
    "Bees pollinate many of the crops we eat. In recent years their numbers have fallen because of pesticides, "
    "disease and the loss of wild flowers, which worries farmers and scientists alike.",
    "Learning to code takes patience. Beginners often start with small projects, make many mistakes, and slowly "
    "build the habits of reading error messages and searching for answers.",
    "The library will close for two weeks in March for repairs to its roof. During that time, books can be "
    "returned at the community center, and the online catalog will stay open.",
    "Remote work has become common since 2020. Many workers enjoy skipping the commute, but some miss talking "
    "with colleagues and find it hard to separate work from home life.",
    "A healthy breakfast gives you energy for the morning. Foods like oatmeal, eggs, fruit and yogurt are good "
    "choices, while sugary cereals can leave you hungry again soon.",
]

SUBJECTS = """the ocean; autumn leaves; a rainy morning; the moon; a cup of coffee; friendship; a city at night;
mountains; a lost cat; the first day of school; a library; the stars; a robot learning to paint; a lighthouse;
summer vacation; an old tree; snow; a busy kitchen; a train journey; the sun rising; a garden; a birthday; a
thunderstorm; the desert; a small village; a dragon who is afraid of the dark; a detective who loves tea; a
penguin who wants to fly; a time traveler; a shy musician""".replace("\n", " ").split("; ")

SITUATIONS = """I have too much work and not enough time; I want to change careers but I am scared; my friend
forgot my birthday; I can't focus when I study; I feel nervous before exams; I want to eat healthier but I love
snacks; I just moved to a new city and feel lonely; my code keeps crashing and I don't know why; I want to start
exercising but I have no motivation; I keep forgetting people's names; I spend too much money on takeout; my
roommate is very messy; I have a job interview tomorrow; I want to learn programming but don't know where to
start; I get distracted by my phone; I need to give a speech at a wedding""".replace("\n", " ").split("; ")

RECIPIENTS = ["my manager", "a new client", "my landlord", "my teacher", "a colleague", "my team", "a customer",
              "a friend"]
TOPICS = ["a project delay", "a request for a day off", "a meeting next week", "a broken heater",
          "thanks for their help", "a change in the schedule", "a late payment", "an invitation to lunch"]

EXPLAIN = ["Explain {} in simple terms.", "What is {}?", "How does {} work?", "Why is {} important?",
           "Give me a short overview of {}.", "Can you explain {} to a beginner?"]
HOWTO = ["How do I {}?", "What is the best way to {}?", "Give me step-by-step instructions to {}.",
         "What are some tips to {}?"]
CODE = ["Write a Python function that {}.", "Write a {lang} function that {task}.",
        "How can I write a program that {}?", "Show me Python code that {}, with a short explanation."]
LISTS = ["List {n} {x}.", "Give me {n} {x}.", "What are some {x}?"]
COMPARE = ["What is the difference between {}?", "Compare {}."]
REWRITE = ['Fix the grammar in this sentence: "{}"', 'Rewrite this sentence to sound more formal: "{}"',
           'Correct the mistakes in this sentence: "{}"']
SUMMARIZE = ["Summarize this in one sentence: {}", "What is the main idea of this text? {}",
             "Rewrite this paragraph in simpler words: {}"]
CREATIVE = ["Write a short poem about {}.", "Write a haiku about {}.", "Tell me a short story about {}.",
            "Describe {} in a few sentences."]
ADVICE = ["{}. What should I do?", "{}. Any advice?"]


def chat_prompts(seed: int = 0) -> list[ChatPrompt]:
    """Every prompt, in a fixed order."""
    rng = random.Random(seed)
    out = [ChatPrompt("explain", c, t.format(c)) for c in CONCEPTS for t in EXPLAIN]
    out += [ChatPrompt("howto", task, t.format(task)) for task in TASKS for t in HOWTO]
    for task in CODE_TASKS:
        out += [ChatPrompt("code", task, t.format(task, lang=rng.choice(LANGUAGES[1:]), task=task)) for t in CODE]
    out += [ChatPrompt("list", x, t.format(n=rng.choice([3, 4, 5, 5, 7, 10]), x=x)) for x in THINGS for t in LISTS]
    out += [ChatPrompt("compare", p, t.format(p)) for p in PAIRS for t in COMPARE]
    out += [ChatPrompt("rewrite", s, t.format(s)) for s in SENTENCES for t in REWRITE]
    out += [ChatPrompt("summarize", p[:40], t.format(p)) for p in PARAGRAPHS for t in SUMMARIZE]
    out += [ChatPrompt("creative", s, t.format(s)) for s in SUBJECTS for t in CREATIVE]
    out += [ChatPrompt("advice", s, t.format(s[0].upper() + s[1:])) for s in SITUATIONS for t in ADVICE]
    out += [ChatPrompt("email", f"{r}/{topic}", f"Write a short email to {r} about {topic}.")
            for r in RECIPIENTS for topic in TOPICS]
    out += [arithmetic(rng, i) for i in range(120)]
    return out


def arithmetic(rng: random.Random, i: int) -> ChatPrompt:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    texts = [f"What is {a} times {b}?", f"What is {a} plus {b} minus {c}?",
             f"If I have {a} apples and give away {min(a - 1, c)}, how many are left?",
             f"A train travels {a * 10} km in {c} hours. What is its average speed?",
             f"Solve for x: {c}x + {a} = {c * b + a}.", f"What is {a}% of {b * 10}?"]
    return ChatPrompt("arithmetic", str(i), texts[i % len(texts)])


def split(prompts: list[ChatPrompt]) -> tuple[list[ChatPrompt], list[ChatPrompt]]:
    """(train, held out)."""
    return [p for p in prompts if not p.held_out], [p for p in prompts if p.held_out]


def main() -> None:
    prompts = chat_prompts()
    train, held = split(prompts)
    kinds = sorted({p.kind for p in prompts})
    print(f"{len(prompts)} prompts: {len(train)} train, {len(held)} held out")
    for kind in kinds:
        of_kind = [p for p in prompts if p.kind == kind]
        print(f"  {kind:11} {len(of_kind):5}  e.g. {of_kind[len(of_kind) // 2].text[:90]}")


if __name__ == "__main__":
    main()
