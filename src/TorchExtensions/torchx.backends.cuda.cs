using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class backends
    {
        /// <summary>
        /// libtorch's switch for its cuDNN SDPA backend (PyTorch's torch.backends.cuda.enable_cudnn_sdp), which TorchSharp
        /// does not expose: read and set through at::globalContext() in the loaded libtorch_cpu. cuDNN builds an execution
        /// graph for every new attention shape (hundreds of milliseconds each), so attention whose shapes change from call
        /// to call (packed examples, padded batches of varying width) should not take it; flash and memory-efficient
        /// attention need no build. Where the library or its symbols cannot be found (another libtorch build), the switch
        /// does nothing and <see cref="cudnn_sdp_available"/> is false.
        /// </summary>
        public static class cuda
        {
            [UnmanagedFunctionPointer(CallingConvention.Cdecl)] private delegate IntPtr GlobalContext();
            [UnmanagedFunctionPointer(CallingConvention.Cdecl)] private delegate void SetFlag(IntPtr context, byte on);
            [UnmanagedFunctionPointer(CallingConvention.Cdecl)] private delegate byte GetFlag(IntPtr context);

            private static readonly IntPtr context;
            private static readonly SetFlag? set;
            private static readonly GetFlag? get;

            static cuda()
            {
                try
                {
                    if (LoadedLibraries.First("libtorch_cpu.so") is not { } path || !NativeLibrary.TryLoad(path, out var lib)) return;
                    // Itanium C++ ABI names of at::globalContext(), at::Context::setSDPUseCuDNN(bool) and userEnabledCuDNNSDP().
                    if (!NativeLibrary.TryGetExport(lib, "_ZN2at13globalContextEv", out var global)
                        || !NativeLibrary.TryGetExport(lib, "_ZN2at7Context14setSDPUseCuDNNEb", out var setter)
                        || !NativeLibrary.TryGetExport(lib, "_ZNK2at7Context19userEnabledCuDNNSDPEv", out var getter)) return;
                    context = Marshal.GetDelegateForFunctionPointer<GlobalContext>(global)();
                    (set, get) = (Marshal.GetDelegateForFunctionPointer<SetFlag>(setter), Marshal.GetDelegateForFunctionPointer<GetFlag>(getter));
                }
                catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException)
                {
                    context = IntPtr.Zero;
                }
            }

            /// <summary>Whether the switch was found in the loaded libtorch.</summary>
            public static bool cudnn_sdp_available => context != IntPtr.Zero && set != null && get != null;

            /// <summary>Whether SDPA may pick cuDNN (false where the switch is not available).</summary>
            public static bool cudnn_sdp_enabled() => cudnn_sdp_available && get!(context) != 0;

            /// <summary>Lets SDPA pick cuDNN or not (nothing where the switch is not available).</summary>
            public static void enable_cudnn_sdp(bool enabled)
            {
                if (cudnn_sdp_available) set!(context, enabled ? (byte)1 : (byte)0);
            }

            /// <summary>
            /// cuDNN attention off until the returned scope is disposed (then as it was), for attention on CUDA whose shapes
            /// vary; null (nothing to do) for a query elsewhere.
            /// </summary>
            public static IDisposable? without_cudnn_sdp(Tensor query) => query.device.type == TorchSharp.DeviceType.CUDA ? new CudnnOff() : null;

            /// <summary>cuDNN attention off until disposed, on any device.</summary>
            public static IDisposable without_cudnn_sdp() => new CudnnOff();

            private sealed class CudnnOff : IDisposable
            {
                private readonly bool restore;

                public CudnnOff()
                {
                    if (!cudnn_sdp_enabled()) return;
                    enable_cudnn_sdp(false);
                    restore = true;
                }

                public void Dispose()
                {
                    if (restore) enable_cudnn_sdp(true);
                }
            }
        }
    }
}
