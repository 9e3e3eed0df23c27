namespace LoRAHub.Host.Plugins;

/// <summary>A plugin cannot be used; the message is the reason shown by `loraHub methods`.</summary>
public sealed class PluginLoadException(string message) : Exception(message);
