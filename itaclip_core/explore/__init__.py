"""What the notebooks in `notebooks/` share, so that each notebook stays a thin sequence of calls and figures.

- `runs`: a notebook run (`start_notebook`): the shared parameters, output folders, seeds, figures under stable
  names and the results JSON written by the last cell (`NotebookRun.write_results`).
- `settings`: the model, dataset and settings the parameters name (`load_model`, `open_dataset`), settings for typed
  class names (`open_vocabulary_config`, `shipped_aux_texts`, `set_classes_with_texts`).
- `image_side`: patch tokens and their PCA colours, the attention of one query patch, the logits of each
  image-engineering view, the post-processing step by step.
- `evaluation`: evaluation on a dataset subset, the I / T / A ablation of the ITACLIP paper, the auxiliary-text sweep.
- `comparison`: comparisons of configurations (`itaclip compare`'s machinery) from notebook parameters, the person
  study's steps, error maps of one class.
- `methods`: the method zoo side by side (settings for typed classes, the attention of one query patch).
- `speed`: throughput and peak memory (the straightforward algorithm is `itaclip_core.reference`).
- `notebook_files`: notebooks without outputs: `python -m itaclip_core.explore strip|check notebooks/*.ipynb`.

Everything is available as `itaclip_core.explore.<name>`.
"""

from itaclip_core.explore.comparison import *  # noqa: F401,F403
from itaclip_core.explore.evaluation import *  # noqa: F401,F403
from itaclip_core.explore.image_side import *  # noqa: F401,F403
from itaclip_core.explore.methods import *  # noqa: F401,F403
from itaclip_core.explore.notebook_files import *  # noqa: F401,F403
from itaclip_core.explore.runs import *  # noqa: F401,F403
from itaclip_core.explore.settings import *  # noqa: F401,F403
from itaclip_core.explore.speed import *  # noqa: F401,F403
