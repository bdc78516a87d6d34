"""`python -m mergekit_wp.scoring CONFIG`: the `score` command, for launchers that take a module.

torchrun --nproc_per_node 4 -m mergekit_wp.scoring scoring/paper/llama-3.2-3b-instruct.yml
accelerate launch --num_processes 4 -m mergekit_wp.scoring scoring/zoo-instruct.yml
"""

from mergekit_wp.scoring.cli import score

score(prog_name="python -m mergekit_wp.scoring")
