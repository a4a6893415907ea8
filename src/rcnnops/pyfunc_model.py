"""MLflow "model from code" entry: MLflow runs this file when it loads a registered
rcnnops model (instead of unpickling a Python object). Not imported by the package."""

import mlflow.models

from rcnnops.pyfunc import DetectorPyfunc

mlflow.models.set_model(DetectorPyfunc())
