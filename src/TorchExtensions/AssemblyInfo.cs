using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("LoRAHub.TorchExtensions.Tests")]
