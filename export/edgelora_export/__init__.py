"""edgelora's workstation side: torch, transformers, optimum, peft. Never installed on the edge."""
