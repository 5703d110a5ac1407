"""Class-incremental continual learning with a binary backbone.

CWR* head consolidation, 1-bit latent replay and hybrid quantisation (Vorabbi et al.).

The pieces are kept apart so each can be tested on its own: `scenario` (the stream of
experiences), `cwr` (the CWR* head consolidation rule), `replay` (the 1-bit latent-replay
buffer), `quant` (hybrid forward/backward quantisation) and `runner` (the strategy loop).
"""
