"""A fixed set of chat prompts, written for this course, to see whether a compressed model still answers the same.

Three kinds, as in the course's applications chapter: customer-service
replies, short facts, and short code tasks. The list is fixed (do not reorder
or edit: recorded agreement numbers refer to it by index); quick runs take
the first few of each kind through :func:`prompts`.
"""

from __future__ import annotations

KINDS = ("customer-service", "facts", "code")

CUSTOMER_SERVICE: tuple[str, ...] = (
    "My order arrived damaged. What should I do?",
    "I was charged twice for the same purchase. Can you help?",
    "How do I reset my password?",
    "Can I change the delivery address of an order I placed yesterday?",
    "My package says delivered but I never received it.",
    "How long does a refund usually take?",
    "I want to cancel my subscription. How do I do that?",
    "The product I bought stopped working after one week. What are my options?",
    "Do you ship internationally?",
    "I received the wrong size. How can I exchange it?",
    "Write a short, polite reply to a customer whose flight was delayed by three hours.",
    "A customer says the app crashes when they open it. Reply with two troubleshooting steps.",
    "How can I contact a human agent?",
    "Is there a discount for students?",
    "Apologize to a customer whose table reservation was lost, in two sentences.",
    "What information do you need to track my order?",
    "My coupon code is not working at checkout. Why?",
)

FACTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many days are there in a leap year?",
    "What is the boiling point of water at sea level in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What gas do plants absorb from the air?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "What is the square root of 81?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "How many legs does a spider have?",
    "What is the freezing point of water in Fahrenheit?",
    "What is the longest river in Africa?",
    "In which year did the first person walk on the Moon?",
    "What is 12 times 12?",
)

CODE: tuple[str, ...] = (
    "Write a Python function that returns the sum of a list of numbers.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that reverses a list.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that returns the largest number in a list.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python one-liner that squares every number in a list.",
    "Write a Python function that removes duplicates from a list, keeping the order.",
    "How do I read a text file line by line in Python?",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a SQL query that selects all rows from a table named users.",
    "Write a Python function that merges two dictionaries.",
    "What does the len function do in Python?",
    "Write a Python function that returns the average of a list of numbers.",
)

ALL: dict[str, tuple[str, ...]] = {"customer-service": CUSTOMER_SERVICE, "facts": FACTS, "code": CODE}


def prompts(per_kind: int | None = None, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str]]:
    """(kind, prompt) pairs in a fixed order: the first ``per_kind`` of each kind (all when None)."""
    if per_kind is not None and (not isinstance(per_kind, int) or per_kind < 1):
        raise ValueError(f"per_kind must be a positive int or None (all), got {per_kind!r}")
    unknown = [k for k in kinds if k not in ALL]
    if unknown:
        raise ValueError(f"unknown prompt kinds {unknown}; choose from {KINDS}")
    return [(k, p) for k in kinds for p in ALL[k][:per_kind]]


# Prompts whose answers quote their input: extraction, editing a given piece of code, a reply that cites a
# policy. Prompt-lookup decoding (chapter 07) drafts from the prompt, so these are where it should pay; the
# three kinds above are answers that mostly do not quote, where it must not cost. Not part of KINDS: the
# agreement numbers recorded for the 50 prompts above stay as they are.
_POLICY = ("Returns policy: Items can be returned within 30 days of delivery for a full refund. Items must be "
           "unused and in their original packaging. Refunds are issued to the original payment method within "
           "5 business days after we receive the item. Shipping costs are not refunded.")

QUOTING: tuple[str, ...] = (
    f"{_POLICY}\n\nA customer asks: can I get my shipping costs back? Reply politely and quote the sentence of "
    "the policy that answers the question.",
    "Add a docstring to this Python function and write out the whole function:\n\n"
    "def average(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n"
    "    return total / len(numbers)\n",
    "Rename the variable `x` to `count` in this code and write out the whole code:\n\n"
    "def count_words(text):\n    x = 0\n    for word in text.split():\n        x += 1\n    return x\n",
    "Fix the spelling mistakes in this paragraph and write out the corrected paragraph:\n\n"
    "Our store is open from Monday to Friday. We recieve new products every week, and our staff is always "
    "happy to help you find what you are looking for. Please contact us if you have any questions.",
    f"{_POLICY}\n\nCopy the sentence of this policy that says how refunds are paid, word for word.",
    "Rewrite this function so that it uses a list comprehension, and write out the whole function:\n\n"
    "def squares(numbers):\n    result = []\n    for n in numbers:\n        result.append(n * n)\n    return result\n",
)


def lookup_prompts(per_kind: int = 2) -> dict[str, list[str]]:
    """Prompt-lookup's two groups: ``quoting`` (the first 3 * ``per_kind`` of :data:`QUOTING`) and ``other``
    (the first ``per_kind`` of each of the three kinds above, answers that do not quote)."""
    if isinstance(per_kind, bool) or not isinstance(per_kind, int) or not 1 <= per_kind <= len(QUOTING) // 3:
        raise ValueError(f"per_kind must be an int from 1 to {len(QUOTING) // 3}, got {per_kind!r}")
    return {"quoting": list(QUOTING[:3 * per_kind]), "other": [p for _, p in prompts(per_kind)]}
