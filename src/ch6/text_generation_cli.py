"""Megatron-LM's interactive client for the text-generation server: prompt, number of tokens, response.

    python src/ch6/text_generation_cli.py localhost:5000

Each round asks for a prompt and a number of tokens, sends Megatron's
``PUT /api`` request and prints the text. Server errors (400, 500, ...) and a
server that cannot be reached are shown as one-line messages, never as a
traceback; end of input (Ctrl-D) or Ctrl-C ends the session.
"""
from __future__ import annotations

import argparse
import sys

import requests


def api_url(address: str) -> str:
    address = address.rstrip("/")
    if not address.startswith(("http://", "https://")):
        address = "http://" + address
    return address + "/api"


def ask_tokens(read) -> int | None:
    while True:
        answer = read("Enter number of tokens to generate: ").strip()
        try:
            n = int(answer)
            if n < 0:
                raise ValueError
            return n
        except ValueError:
            print(f"error: the number of tokens must be an integer >= 0, got {answer!r}", flush=True)


def ask(url: str, prompt: str, tokens: int, timeout: float) -> str:
    """One request; the generated text, or a line that starts with 'error'."""
    try:
        r = requests.put(url, json={"prompts": [prompt], "tokens_to_generate": tokens}, timeout=timeout)
    except requests.RequestException as e:
        return f"error: cannot reach the server at {url}: {type(e).__name__}"
    try:
        body = r.json()
    except ValueError:
        return f"error {r.status_code}: the server answered something that is not JSON: {r.text[:200]!r}"
    if r.status_code != 200:
        return f"error {r.status_code}: {body.get('message', body) if isinstance(body, dict) else body}"
    return body["text"][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address", help="HOST:PORT of the server, e.g. localhost:5000")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one answer")
    args = p.parse_args(argv)
    url = api_url(args.address)
    try:
        while True:
            prompt = input("Enter prompt: ")
            tokens = ask_tokens(input)
            answer = ask(url, prompt, tokens, args.timeout)
            if answer.startswith("error"):
                print(answer, flush=True)
            else:
                print("Megatron Response: ", flush=True)
                print(answer, flush=True)
    except (EOFError, KeyboardInterrupt):
        print(flush=True)
        return 0


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
