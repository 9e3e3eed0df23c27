namespace LoRAHub.Torch;

/// <summary>Kinds of native errors; mirrors LhErrorKind in native/src/lh_common.h.</summary>
public enum TorchErrorKind
{
    None = 0,
    Generic = 1,
    OutOfMemory = 2,
    Index = 3,
    Value = 4,
    Type = 5,
    NotImplemented = 6,
    Argument = 7,
}

/// <summary>An error raised inside libtorch (shape mismatch, bad index, ...), carrying libtorch's message.</summary>
public class TorchException : Exception
{
    public TorchErrorKind Kind { get; }

    public TorchException(TorchErrorKind kind, string message, Exception? inner = null) : base(message, inner) => Kind = kind;

    internal static TorchException Create(TorchErrorKind kind, string message) => kind switch
    {
        TorchErrorKind.OutOfMemory => new OutOfMemoryTorchException(message),
        _ => new TorchException(kind, message.TrimEnd()),
    };
}

/// <summary>The device (usually CUDA) ran out of memory. The message suggests what to change.</summary>
public sealed class OutOfMemoryTorchException : TorchException
{
    public OutOfMemoryTorchException(string message)
        : base(TorchErrorKind.OutOfMemory,
            message.TrimEnd() + Environment.NewLine +
            "Out of device memory: lower the batch size or sequence length, turn on activation checkpointing, " +
            "or use a quantized base model (QLoRA).")
    {
    }
}
