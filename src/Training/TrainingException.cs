namespace LoRAHub.Training;

/// <summary>The run cannot go on; the message says why and what to change. Completed checkpoints stay on disk.</summary>
public sealed class TrainingException(string message, Exception? inner = null) : Exception(message, inner);
