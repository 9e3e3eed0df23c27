namespace LoRAHub.TorchExtensions;

/// <summary>Kinds of libtorch errors, recognised from the message (libtorch 2.x names its C++ exception in it).</summary>
public enum TorchErrorKind
{
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

    public TorchException(TorchErrorKind kind, string message, Exception? inner = null) : base(message.TrimEnd(), inner) => Kind = kind;
}

/// <summary>The device (usually CUDA) ran out of memory. The message suggests what to change.</summary>
public sealed class OutOfMemoryTorchException : TorchException
{
    public OutOfMemoryTorchException(string message, Exception? inner = null)
        : base(TorchErrorKind.OutOfMemory,
            message.TrimEnd() + Environment.NewLine +
            "Out of device memory: lower the batch size or sequence length, turn on activation checkpointing " +
            "(gradient checkpointing), or use a quantized base model (QLoRA).", inner)
    {
    }
}
