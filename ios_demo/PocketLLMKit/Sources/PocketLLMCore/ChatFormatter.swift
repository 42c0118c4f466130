import Foundation

public enum ChatRole: String, Codable, Sendable, CaseIterable {
    case system
    case user
    case assistant
}

public struct ChatMessage: Codable, Equatable, Sendable {
    public var role: ChatRole
    public var content: String

    public init(role: ChatRole, content: String) {
        self.role = role
        self.content = content
    }
}

/// The text the model continues.
public struct ChatPrompt: Equatable, Sendable {
    public let text: String
    /// A system prompt was given but the template has no system role, so it is not in `text`.
    public let droppedSystemPrompt: Bool
}

/// Turns a conversation into the model's prompt text from the manifest's `chat` prefix/suffix strings, which the
/// exporter derived by rendering the checkpoint's Jinja template: the result is byte-identical to that rendering
/// (tests compare against Python's rendering of the same template).
///
/// With the template, each message becomes `roles[role].prefix + content + roles[role].suffix`, a non-empty system
/// prompt goes first as a system message, and `generation_prefix` follows the last message. Without it (template
/// off, or a bundle without `chat`), the prompt is the messages' contents joined as plain text, which the model
/// simply continues; the system prompt is not used then.
public struct ChatFormatter: Sendable {
    public let template: ChatTemplate?

    public init(template: ChatTemplate?) {
        self.template = template
    }

    public func prompt(for messages: [ChatMessage], systemPrompt: String = "", useTemplate: Bool = true) throws
        -> ChatPrompt
    {
        guard useTemplate, let template else {
            return ChatPrompt(text: messages.map(\.content).joined(), droppedSystemPrompt: false)
        }
        var text = ""
        var dropped = false
        let system = systemPrompt.trimmingCharacters(in: .whitespacesAndNewlines)
        if !system.isEmpty {
            if let affixes = template.roles[ChatRole.system.rawValue] {
                text += affixes.prefix + system + affixes.suffix
            } else {
                dropped = true
            }
        }
        for (index, message) in messages.enumerated() {
            guard let affixes = template.roles[message.role.rawValue] else {
                throw PocketLLMError.manifestInvalid(
                    path: Manifest.fileName, key: "chat.roles",
                    reason: "has no \"\(message.role.rawValue)\" role (needed by message \(index))")
            }
            text += affixes.prefix + message.content + affixes.suffix
        }
        text += template.generationPrefix
        return ChatPrompt(text: text, droppedSystemPrompt: dropped)
    }
}
