namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// A kernel program could not be compiled (NVRTC's log in the message) or loaded by the driver. LoRAHub's kernels are
/// then turned off for the process (<see cref="CudaKernels.UnavailableReason"/> says why), and the ops that catch this
/// run their composite path instead.
/// </summary>
public sealed class KernelCompileException(string message, Exception? inner = null) : TorchException(TorchErrorKind.Generic, message, inner);
