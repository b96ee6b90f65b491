"""How many tokens SmolLM2-135M-Instruct's nucleus holds (top_p 0.9, 0.95, 0.99), over 40 steps of a sampled
continuation (temperature 1) of each of six prompts. Output: nucleus_sizes.txt."""
import torch

from service.model.base_model import load_base
from service.settings import Settings

PROMPTS = ["The history of the Normans", "Super Bowl 50 was", "In a small village there lived",
           "The theory of relativity", "Question: What is the capital of France?\nAnswer:", "Once upon a time"]


def main() -> None:
    model, tokenizer = load_base(Settings())
    sizes: dict[float, list[int]] = {0.9: [], 0.95: [], 0.99: []}
    generator = torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        for _ in range(40):
            with torch.no_grad():
                probs = model(ids).logits[0, -1].double().softmax(-1)
            ordered = probs.sort(descending=True).values
            for top_p, found in sizes.items():
                found.append(int(((ordered.cumsum(-1) - ordered) < top_p).sum()))
            ids = torch.cat([ids, torch.multinomial(probs.float(), 1, generator=generator)[None]], dim=1)
    for top_p, found in sizes.items():
        counts = torch.tensor(found, dtype=torch.float64)
        print(f"top_p {top_p}: nucleus sizes over {len(counts)} steps: median {counts.median():.0f}, "
              f"90th percentile {counts.quantile(0.9):.0f}, max {counts.max():.0f}; "
              f"above 1,024: {(counts > 1024).sum():.0f}, above 8,192: {(counts > 8192).sum():.0f}")


if __name__ == "__main__":
    main()
