"""The Predictor port and its in-process adapter.

CONTRACT (to be implemented):

class Predictor(Protocol):
    info: ModelInfo
    def predict(self, batch: np.ndarray) -> np.ndarray:
        '''(N, bands, size, size) in the source dtype -> (N, classes) float32 scores.
        Raises chipscale.errors.PredictorUnavailable for transient failures.'''
    def close(self) -> None: ...

class InProcessPredictor: Predictor
    def __init__(self, path: str | Path, *, device: str = "cpu", sub_batch: int = 32, threads: int | None = None)
       loads via model_server.chipscale_runtime.load_model; a state_dict or a file without
       metadata raises chipscale.errors.ModelFormatError with a message saying how to export.

def open_predictor(spec: str | Path | None) -> Predictor
    None -> the bundled demo model (examples/demo-model.pt, built if missing);
    a path -> InProcessPredictor; an http(s) URL -> (issue 3) TorchServePredictor.
"""
