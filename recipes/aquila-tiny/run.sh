#!/usr/bin/env bash
# The aquila-tiny recipe, every step in order (about 40 minutes on an otherwise idle 2-core CPU):
#   1. gather the corpus and SFT conversations from ../shared/data (held-out slice kept apart)
#   2. train the bilingual byte-level BPE tokenizer (8000 + 8 special tokens)
#   3. filter the SFT conversations to those that fit 512 tokens
#   4. pretrain from scratch (pretrain.yaml)
#   5. fine-tune in the aquila-chat template (sft.yaml)
#   6. evaluate (held-out perplexity, sample answers) and copy the model into the package
#   7-9 (not run by default: STEPS=7,8,9): image instructions (#text2image#, #InstructFace#) taught
#      on top of step 5's model in two phases (attempt 4), and how often requests are routed to them.
# The bundled model is not step 6's: it is attempt 25f of docs/aquila-tiny.md ("Image instructions"),
# a chain of stages from a rebuilt step 4 whose commands are listed there with each attempt.
# Outputs go to runs/aquila-tiny/ (ignored by git). STEPS=4,5 runs only some steps.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=runs/aquila-tiny
STEPS=${STEPS:-1,2,3,4,5,6}
has() { [[ ",$STEPS," == *",$1,"* ]]; }

has 1 && python recipes/aquila-tiny/prepare_data.py
has 2 && python -m aquilachat tokenizer train --vocab-size 8000 --out $R/tokenizer \
           --input $R/data/pretrain_zh.txt $R/data/pretrain_en.txt $R/data/pretrain_code.txt
has 3 && python recipes/aquila-tiny/filter_sft.py
has 4 && python -m aquilachat pretrain recipes/aquila-tiny/pretrain.yaml --no-progress
has 5 && python -m aquilachat sft recipes/aquila-tiny/sft.yaml --no-progress
has 6 && python recipes/aquila-tiny/finish.py
if has 7; then
  python recipes/aquila-tiny/instructions.py
  python recipes/aquila-tiny/instructions.py --draw 600 --edit 120 --replay 4000 --replay-max-tokens 256 \
         --mix-seed 2 --name instructions_train2.jsonl
fi
if has 8; then
  python -m aquilachat sft recipes/aquila-tiny/sft_instructions.yaml --no-progress
  python -m aquilachat sft recipes/aquila-tiny/sft_instructions2.yaml --no-progress
fi
has 9 && python recipes/aquila-tiny/routing.py --model $R/instructions2/final
echo "done: see $R/report.json and aquilachat/assets/aquila-tiny/"
