package org.pocketllm.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertTrue
import org.junit.Test

class ChatTest {
    private fun formatOf(case: Fixtures.ChatCase): ChatFormat {
        val chat = ManifestParser.parse(case.manifest).chat
        assertNotNull("${case.name}: manifest has no chat format", chat)
        return chat!!
    }

    @Test
    fun multiTurnChatsMatchTheJinjaRenderingByteForByte() {
        assertTrue("no chat cases in the fixtures", Fixtures.chats.isNotEmpty())
        for (case in Fixtures.chats) {
            val formatter = ChatFormatter(formatOf(case))
            for ((i, conv) in case.conversations.withIndex()) {
                assertEquals("${case.name} conversation $i", conv.expected, formatter.render(conv.messages))
            }
        }
    }

    @Test
    fun aFollowUpTurnSendsOnlyTheNewTextAfterACleanStop() {
        for (case in Fixtures.chats) {
            val chat = formatOf(case)
            val formatter = ChatFormatter(chat)
            val session = ChatSession(chat)
            val first = session.plan("What is 2 + 2?", "", true)
            assertTrue(first.resetContext)
            assertEquals(formatter.render(listOf(ChatMessage(Role.USER, "What is 2 + 2?"))), first.prompt)
            session.commit(first, "What is 2 + 2?", "4.", true, "", true)

            val second = session.plan("And 3 + 3?", "", true)
            val whole = formatter.render(listOf(ChatMessage(Role.USER, "What is 2 + 2?"),
                ChatMessage(Role.ASSISTANT, "4."), ChatMessage(Role.USER, "And 3 + 3?")))
            if (chat.generationPrefix == chat.roles.getValue(Role.ASSISTANT).prefix) {
                assertFalse(case.name, second.resetContext)
                assertEquals(case.name, whole, first.prompt + "4." + second.prompt)
                assertTrue(case.name, second.prompt.startsWith(chat.roles.getValue(Role.ASSISTANT).suffix))
            } else {
                // e.g. Llama 2: history renders "[/INST] 4." where the reply followed "[/INST]": not a continuation
                assertTrue(case.name, second.resetContext)
                assertEquals(case.name, whole, second.prompt)
            }
        }
    }

    @Test
    fun afterAStopMidReplyTheWholeConversationIsSentAgain() {
        val chat = formatOf(Fixtures.chats[0])
        val session = ChatSession(chat)
        val first = session.plan("Tell me a story.", "", true)
        session.commit(first, "Tell me a story.", "Once upon", false, "", true)
        val second = session.plan("Go on.", "", true)
        assertTrue(second.resetContext)
        assertEquals(ChatFormatter(chat).render(second.messages), second.prompt)
        assertEquals(3, second.messages.size)
    }

    @Test
    fun aNewSystemPromptStartsOver() {
        for (case in Fixtures.chats) {
            val chat = formatOf(case)
            val session = ChatSession(chat)
            val first = session.plan("Hi", "Be brief.", true)
            session.commit(first, "Hi", "Hello.", true, "Be brief.", true)
            val second = session.plan("Bye", "Be verbose.", true)
            assertTrue(case.name, second.resetContext)
            if (chat.supportsSystem) {
                assertEquals(ChatMessage(Role.SYSTEM, "Be verbose."), second.messages[0])
            } else {
                assertTrue(case.name, second.messages.none { it.role == Role.SYSTEM })  // no system turn to put it in
            }
        }
    }

    @Test
    fun withTheTemplateOffEachMessageIsAPlainCompletion() {
        val session = ChatSession(formatOf(Fixtures.chats[0]))
        val plan = session.plan("It is a truth universally acknowledged", "ignored", false)
        assertEquals("It is a truth universally acknowledged", plan.prompt)
        assertTrue(plan.resetContext)
        session.commit(plan, "It is a truth universally acknowledged", ", that", true, "ignored", false)
        assertTrue(session.plan("Again", "", true).resetContext)
        val none = ChatSession(null)
        assertFalse(none.canUseTemplate)
        assertEquals("plain", none.plan("plain", "", true).prompt)
    }

    @Test
    fun stopTextsComeFromTheStopTokensAndTheAssistantSuffix() {
        for (case in Fixtures.chats) {
            val chat = formatOf(case)
            val suffix = chat.roles.getValue(Role.ASSISTANT).suffix.trim()
            val texts = ChatFormatter(chat).stopTexts(listOf("</s>", ""))
            assertEquals("</s>", texts[0])
            if (suffix.length > 0 && !suffix.startsWith("</s>")) assertTrue(case.name, suffix in texts)
        }
    }
}
