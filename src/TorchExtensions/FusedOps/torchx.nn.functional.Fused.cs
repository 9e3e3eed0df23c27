using LoRAHub.TorchExtensions.Cuda;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class nn
    {
        public static partial class functional
        {
            /// <summary>
            /// Switches for LoRAHub's fused CUDA kernels, read once from LORAHUB_FUSED: unset or "1" turns all on except
            /// gqa (a memory-for-speed trade, see <see cref="Gqa"/>), "0" all off, otherwise a comma-separated list of those
            /// to turn on (rmsnorm, swiglu, rope, gqa, dora, doranorm, lora_mlp, lora_qkv).
            /// Settable at run time. A switched-on kernel still runs only where it applies (a CUDA tensor of fp32, fp16
            /// or bf16, and <see cref="KernelsAvailable"/>); elsewhere the composite TorchSharp ops run.
            /// </summary>
            public static class Fused
            {
                static Fused()
                {
                    var spec = Environment.GetEnvironmentVariable("LORAHUB_FUSED")?.Trim().ToLowerInvariant();
                    if (string.IsNullOrEmpty(spec) || spec == "1" || spec == "all")
                    {
                        RmsNorm = SwiGlu = Rope = Dora = DoraNorm = LoraMlp = LoraQkv = true;
                        return;
                    }
                    if (spec is "0" or "none") return;
                    var names = spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
                    foreach (var name in names)
                        if (name is not ("rmsnorm" or "swiglu" or "rope" or "gqa" or "dora" or "doranorm" or "lora_mlp" or "lora_qkv"))
                            throw new ArgumentException($"LORAHUB_FUSED: unknown kernel '{name}' (rmsnorm, swiglu, rope, gqa, dora, doranorm, lora_mlp, lora_qkv; or 0 / 1)");
                    RmsNorm = names.Contains("rmsnorm");
                    SwiGlu = names.Contains("swiglu");
                    Rope = names.Contains("rope");
                    Gqa = names.Contains("gqa");
                    Dora = names.Contains("dora");
                    DoraNorm = names.Contains("doranorm");
                    LoraMlp = names.Contains("lora_mlp");
                    LoraQkv = names.Contains("lora_qkv");
                }

                /// <summary>Fused RMSNorm kernels (forward and backward).</summary>
                public static bool RmsNorm { get; set; }

                /// <summary>Fused silu(gate) · up kernels.</summary>
                public static bool SwiGlu { get; set; }

                /// <summary>Fused rotary-embedding kernels.</summary>
                public static bool Rope { get; set; }

                /// <summary>
                /// Grouped-query attention without copying k/v to the query's head count where libtorch's own grouped op is
                /// not taken (a mask, dropout, or LORAHUB_SDPA_NATIVE_GQA=0): the query heads are split into groups that each
                /// attend to the unrepeated k/v (see <see cref="scaled_dot_product_attention"/>). Off unless
                /// LORAHUB_FUSED names "gqa": it saves memory (0.17 GiB peak on llama-1b LoRA r16 4×2048 on an H200) but is
                /// slower than repeating k/v for one SDPA call (57,076 vs 59,268 tok/s there); for memory-bound runs.
                /// </summary>
                public static bool Gqa { get; set; }

                /// <summary>The fused DoRA output kernels (DoRA plugin's dora_output, forward and backward).</summary>
                public static bool Dora { get; set; }

                /// <summary>
                /// DoRA's weight norm in one call (DoRA plugin's dora_weight_norm), cached per layer between the forward and
                /// the checkpoint recompute of a step (false: the plugin's plain ops on every forward). Not a kernel; a
                /// switch here so one run can measure with and without it.
                /// </summary>
                public static bool DoraNorm { get; set; }

                /// <summary>
                /// The LoRA MLP block (gate, up, down with their adapters and the gated activation) as one autograd function
                /// with a hand-derived backward (<see cref="LoraFusion.TryMlp"/>), where exact; on any device. Not a kernel
                /// (its GEMMs are libtorch's; the SwiGLU kernel inside follows <see cref="SwiGlu"/>).
                /// </summary>
                public static bool LoraMlp { get; set; }

                /// <summary>The attention's q, k, v projections with their adapters as one autograd function (<see cref="LoraFusion.TryQkv"/>), where exact.</summary>
                public static bool LoraQkv { get; set; }

                /// <summary>
                /// Whether <see cref="LoraMlp"/> and <see cref="LoraQkv"/> also apply to CPU tensors. Off: on the CPU the blocks'
                /// C# autograd functions cost more than they save (the main job on 2 cores: 33.3 s of training fused, 31.6 s
                /// composite), so they run on CUDA tensors only. Tests turn it on to check the blocks against the composite path.
                /// </summary>
                public static bool LoraBlocksOnCpu { get; set; }

                /// <summary>True when the kernels can run here: a CUDA driver and NVRTC were found (see <see cref="CudaKernels"/>).</summary>
                public static bool KernelsAvailable => CudaKernels.Available;

                /// <summary>Why the kernels cannot run (null when they can).</summary>
                public static string? UnavailableReason => CudaKernels.UnavailableReason;

                /// <summary>Kernels launched so far in this process (all of LoRAHub's, forward and backward), for tests and diagnostics.</summary>
                public static long LaunchCount => CudaKernels.LaunchCount;
            }
        }
    }
}
