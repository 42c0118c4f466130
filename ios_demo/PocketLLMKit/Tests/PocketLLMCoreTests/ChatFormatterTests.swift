import Foundation
import XCTest

@testable import PocketLLMCore

final class ChatFormatterTests: XCTestCase {
    /// Multi-turn chats, with and without a system prompt, formatted from the manifest's prefix/suffix strings are
    /// byte-identical to Python's rendering of the checkpoint's Jinja template (transformers' apply_chat_template).
    func testMatchesThePythonRenderingOfTheJinjaTemplate() throws {
        let fixtures = try Fixtures.load()
        if fixtures.chatCases.isEmpty { throw XCTSkip("no bundle with a chat template among the fixtures") }
        for chatCase in fixtures.chatCases {
            let manifest = try Manifest.load(bundle: fixtures.url(chatCase.bundle))
            let template = try XCTUnwrap(manifest.chat, "manifest.json of \(chatCase.bundle) has no chat")
            let prompt = try ChatFormatter(template: template)
                .prompt(for: chatCase.messages, systemPrompt: chatCase.system, useTemplate: true)
            XCTAssertEqual(prompt.text, chatCase.expected)
            XCTAssertEqual(Array(prompt.text.utf8), Array(chatCase.expected.utf8), "byte for byte")
        }
    }

    private let chatML = ChatTemplate(
        roles: [
            "system": .init(prefix: "<|im_start|>system\n", suffix: "<|im_end|>\n"),
            "user": .init(prefix: "<|im_start|>user\n", suffix: "<|im_end|>\n"),
            "assistant": .init(prefix: "<|im_start|>assistant\n", suffix: "<|im_end|>\n"),
        ],
        generationPrefix: "<|im_start|>assistant\n",
        stopIDs: [73440])

    func testTurnsInOrderWithSystemPromptAndGenerationPrefix() throws {
        let messages = [
            ChatMessage(role: .user, content: "Hi"),
            ChatMessage(role: .assistant, content: "Hello."),
            ChatMessage(role: .user, content: "Who are you?"),
        ]
        let prompt = try ChatFormatter(template: chatML).prompt(for: messages, systemPrompt: "Be brief.")
        XCTAssertEqual(
            prompt.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                + "Hello.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
        XCTAssertFalse(prompt.droppedSystemPrompt)
        let noSystem = try ChatFormatter(template: chatML).prompt(for: messages, systemPrompt: "  \n")
        XCTAssertTrue(noSystem.text.hasPrefix("<|im_start|>user\nHi"), "a blank system prompt adds nothing")
    }

    func testTemplateOffIsPlainContinuation() throws {
        let messages = [
            ChatMessage(role: .user, content: "It is a truth universally"),
            ChatMessage(role: .assistant, content: " acknowledged"),
            ChatMessage(role: .user, content: ", that"),
        ]
        let off = try ChatFormatter(template: chatML).prompt(for: messages, systemPrompt: "ignored", useTemplate: false)
        XCTAssertEqual(off.text, "It is a truth universally acknowledged, that")
        let none = try ChatFormatter(template: nil).prompt(for: messages, systemPrompt: "ignored")
        XCTAssertEqual(none.text, off.text, "a bundle without chat formats as plain text")
    }

    func testTemplateWithoutSystemRoleDropsTheSystemPromptVisibly() throws {
        var roles = chatML.roles
        roles["system"] = nil
        let template = ChatTemplate(roles: roles, generationPrefix: chatML.generationPrefix, stopIDs: [])
        let prompt = try ChatFormatter(template: template)
            .prompt(for: [ChatMessage(role: .user, content: "Hi")], systemPrompt: "Be brief.")
        XCTAssertTrue(prompt.droppedSystemPrompt)
        XCTAssertEqual(prompt.text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    }

    func testMissingRoleIsAManifestError() throws {
        let user = try XCTUnwrap(chatML.roles["user"])
        let template = ChatTemplate(roles: ["user": user], generationPrefix: "", stopIDs: [])
        assertThrows(.manifestInvalid(path: "manifest.json", key: "chat.roles",
                                      reason: "has no \"assistant\" role (needed by message 1)"))
        {
            _ = try ChatFormatter(template: template).prompt(for: [
                ChatMessage(role: .user, content: "a"), ChatMessage(role: .assistant, content: "b"),
            ])
        }
    }
}
