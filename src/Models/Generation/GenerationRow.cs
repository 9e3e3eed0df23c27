using LoRAHub.Abstractions;

namespace LoRAHub.Models.Generation;

/// <summary>
/// One row of a mixed batch: its prompt ids, its own decoding options (max tokens, temperature, seed, stop tokens) and
/// the adapter that computes it (<see cref="IAdapterSet.BaseName"/> for the base model), as vLLM and LoRAX batch
/// requests for different adapters. Padding and the KV-cache switch are the batch's: they come from the first row.
/// </summary>
public sealed record GenerationRow(int[] Prompt, GenerationOptions Options, string Adapter = IAdapterSet.BaseName);

/// <summary>Called with each new token of a row as it is chosen; returning false finishes that row (a stop string, a client gone).</summary>
public delegate bool TokenSink(int row, int token);
